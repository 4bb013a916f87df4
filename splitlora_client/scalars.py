"""TensorBoard scalars of a client's metrics records (optional: needs the `tensorboardX` package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

STEP_SCALARS = ("loss", "lr", "seconds", "bytes_sent", "bytes_received", "tokens")
TENSORBOARD_HINT = "TensorBoard scalars need the tensorboardX package: pip install 'splitlora[tensorboard]'"


def tensorboard_available() -> bool:
    """Whether tensorboardX can be imported."""
    return importlib.util.find_spec("tensorboardX") is not None


class TensorBoardScalars:
    """Writes the numbers of each metrics record as TensorBoard scalars under `logdir`."""

    def __init__(self, logdir: Path) -> None:
        if not tensorboard_available():
            raise ValueError(TENSORBOARD_HINT)
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir), flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        """`step` records: loss, lr, seconds, bytes, tokens at the global step; `round` records: clients, samples."""
        if record.get("event") == "step":
            for key in STEP_SCALARS:
                if key in record:
                    self._writer.add_scalar(f"train/{key}", record[key], record["step"])
        elif record.get("event") == "round":
            for key in ("clients", "samples"):
                if key in record:
                    self._writer.add_scalar(f"round/{key}", record[key], record["round"])

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
