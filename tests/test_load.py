"""The load test (scripts/load_test.py) at small scale: 8 concurrent clients against one server process finish
with zero errors, and the server's resident memory does not grow round over round. The 32-client numbers are
in docs/benchmarks.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load_test.py"


def test_eight_concurrent_clients_zero_errors_flat_memory(tmp_path: Path, builtin_model_dir: Path) -> None:
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--clients", "8", "--rounds", "4", "--local-steps", "2",
                           "--output", str(tmp_path / "run"), "--json", str(summary)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["errors"] == [] and result["server_exit_code"] == 0
    assert result["rss_growth_mb_after_warmup"] <= 16.0, result["rss_mb_after_round"]
    assert "3" in result["rss_mb_after_round"]  # a sample after the last round
