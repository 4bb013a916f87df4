"""Real processes through the console scripts: two clients train with --eval-data (validation loss per round in
metrics.jsonl, the server's sample-weighted loss in its log), then `splitlora-client generate` and `evaluate` run
against the same server with the global adapter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from splitlora_bench.procs import BIN
from common.data import Example, synthetic_e2e, write_examples
from tests.test_end_to_end import _start, _wait_all

TRAINING = ["--rounds", "2", "--local-steps", "4", "--batch-size", "4", "--learning-rate", "1e-2",
            "--warmup-steps", "1", "--seed", "0"]


def _client(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "splitlora-client"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_train_with_eval_data_then_generate_and_evaluate(tmp_path: Path, builtin_model_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    held_out = tmp_path / "valid.txt"
    write_examples(held_out, synthetic_e2e(12, seed=99))
    server, port = _start(tmp_path, "server", ["serve", "--clients", "2", "--output", str(tmp_path / "server"),
                                                "--finish-grace-seconds", "5", "--serve-after-training",
                                                "--insecure", *TRAINING], env)
    try:
        address = f"127.0.0.1:{port}"
        clients = [subprocess.Popen([str(BIN / "splitlora-client"), "train", "--server", address, "--client-id", name,
                                     "--seed", str(i), "--output", str(tmp_path / name), "--no-progress",
                                     "--insecure", "--eval-data", str(held_out)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                   for i, name in enumerate(("alice", "bob"))]
        _wait_all(clients)
        records = [json.loads(line) for line in (tmp_path / "alice" / "metrics.jsonl").read_text().splitlines()]
        validation = [r for r in records if r["event"] == "validation"]
        assert [r["round"] for r in validation] == [0, 1]
        assert validation[1]["loss"] < validation[0]["loss"]  # the held-out loss fell with training
        bob = [json.loads(line) for line in (tmp_path / "bob" / "metrics.jsonl").read_text().splitlines()]
        for mine, theirs in zip(validation, [r for r in bob if r["event"] == "validation"]):
            assert abs(mine["loss"] - theirs["loss"]) < 1e-6  # the round's global model, not the next round's

        common = ["--server", address, "--client-id", "alice", "--output", str(tmp_path / "alice"), "--insecure"]
        results = tmp_path / "completions.jsonl"
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"context": ex.context}) + "\n" for ex in synthetic_e2e(3, seed=5)))
        done = _client(["generate", *common, "--prompts", str(prompts), "--max-new-tokens", "8", "--batch-size", "2",
                        "--results", str(results)], env)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        assert len(lines) == 3 and all(0 < r["tokens"] <= 8 for r in lines)
        assert done.stdout.splitlines() == [r["completion"] for r in lines]

        summary = tmp_path / "eval.json"
        done = _client(["evaluate", *common, "--data", str(held_out), "--batch-size", "4", "--max-new-tokens", "8",
                        "--results", str(summary)], env)
        assert done.returncode == 0, done.stderr
        report = json.loads(summary.read_text())
        assert abs(report["loss"] - validation[1]["loss"]) < 1e-5  # the same global model, the same data
        assert set(report["generation"]) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "implementations"}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    log = (tmp_path / "server.log").read_text()
    assert "round 1: validation loss" in log and "sample-weighted over 2 clients" in log
