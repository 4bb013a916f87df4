"""The server's per-step timing record, `metrics.jsonl` in its --output: where a client's step spends its time on
the server (decoding the frame, waiting for and running the engine, encoding the answer) and the process's CPU.
The client's own metrics.jsonl has the other side; `splitlora-bench overhead` joins the two."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path


class StepLog:
    """Append one JSON line per answered step (thread-safe: handler threads of several clients write)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)
        self._lock = threading.Lock()
        self._cpu = time.process_time()

    def step(self, client_id: str, step: int, micro: int, phases: dict[str, float]) -> None:
        """Record a step's phases (seconds); cpu_s: the server process's CPU time (every thread) since the previous
        record, which with one client is this step's."""
        with self._lock:
            cpu, self._cpu = self._cpu, time.process_time()
            record = {"time": round(time.time(), 3), "event": "step", "client": client_id, "step": step,
                      "micro": micro, **{f"{k}_s": round(v, 5) for k, v in phases.items()},
                      "cpu_s": round(self._cpu - cpu, 4)}
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            self._file.close()
