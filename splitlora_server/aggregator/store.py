"""What the aggregator keeps on disk so that a restarted one loses nothing.

- `global/round-NNNN.safetensors`: the global adapter of each closed round; its safetensors header holds the
  round's summary (clients averaged, their sample counts), so the file is also the round's "closed" record.
- `pending/round-NNNN/<hash of the client id>.safetensors`: each accepted submission of the open round, with the
  client id and sample count in its header; dropped when the round closes.

Every file is written atomically (temporary file, fsync, rename). Restoring reads the closed rounds (contiguous
from 0) and the open round's submissions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.atomic import read_safetensors_metadata, save_tensors_atomic
from common.lora import AdapterState, from_bytes

log = logging.getLogger(__name__)
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.safetensors$")


@dataclass
class RoundSummary:
    """Who a closed round averaged, with their sample counts (in client id order)."""

    samples: dict[str, int]

    @property
    def num_clients(self) -> int:
        return len(self.samples)

    @property
    def total_samples(self) -> int:
        return sum(self.samples.values())


class AggregatorStore:
    """The aggregator's files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def global_path(self, round: int) -> Path:
        return self.root / "global" / f"round-{round:04d}.safetensors"

    def _pending_dir(self, round: int) -> Path:
        return self.root / "pending" / f"round-{round:04d}"

    def write_global(self, round: int, state: AdapterState, summary: RoundSummary) -> None:
        """Store a closed round's global adapter and summary, then drop the round's pending submissions."""
        save_tensors_atomic(self.global_path(round), state,
                            {"round": str(round), "samples": json.dumps(summary.samples, sort_keys=True)})
        shutil.rmtree(self._pending_dir(round), ignore_errors=True)

    def read_summary(self, round: int) -> RoundSummary | None:
        """The summary of a closed round from its global file's header (None if absent or unreadable)."""
        try:
            meta = read_safetensors_metadata(self.global_path(round))
            return RoundSummary({k: int(v) for k, v in json.loads(meta["samples"]).items()})
        except Exception as err:  # noqa: BLE001 - OSError, bad JSON, and safetensors' own error types
            if self.global_path(round).exists():
                log.warning("global adapter of round %d is unreadable: %s", round, err)
            return None

    def closed_rounds(self) -> list[int]:
        """Rounds 0..k-1 whose global files are all present and readable (the contiguous prefix)."""
        present = set()
        for path in (self.root / "global").glob("round-*.safetensors"):
            match = _ROUND_FILE.match(path.name)
            if match:
                present.add(int(match.group(1)))
        rounds = []
        while len(rounds) in present and self.read_summary(len(rounds)) is not None:
            rounds.append(len(rounds))
        return rounds

    def drop_rounds_from(self, round: int) -> None:
        """Delete global files of `round` and later (a restarted co-hosted server rolled back past them)."""
        for path in (self.root / "global").glob("round-*.safetensors"):
            match = _ROUND_FILE.match(path.name)
            if match and int(match.group(1)) >= round:
                path.unlink(missing_ok=True)

    def write_pending(self, round: int, client_id: str, num_samples: int, state: AdapterState) -> None:
        """Store an accepted submission of the open round."""
        name = hashlib.sha256(client_id.encode()).hexdigest()[:24]  # client ids are not trusted as file names
        save_tensors_atomic(self._pending_dir(round) / f"{name}.safetensors", state,
                            {"client_id": client_id, "round": str(round), "num_samples": str(num_samples)})

    def drop_pending(self, round: int, client_id: str) -> None:
        name = hashlib.sha256(client_id.encode()).hexdigest()[:24]
        (self._pending_dir(round) / f"{name}.safetensors").unlink(missing_ok=True)

    def read_pending(self, round: int) -> dict[str, tuple[int, AdapterState]]:
        """The stored submissions of `round` (unreadable files are skipped: their clients submit again);
        submissions stored for any other round are deleted."""
        for other in (self.root / "pending").glob("round-*"):
            if other != self._pending_dir(round):
                shutil.rmtree(other, ignore_errors=True)
        pending: dict[str, tuple[int, AdapterState]] = {}
        for path in sorted(self._pending_dir(round).glob("*.safetensors")):
            try:
                meta = read_safetensors_metadata(path)
                pending[meta["client_id"]] = (int(meta["num_samples"]), from_bytes(path.read_bytes()))
            except Exception as err:  # noqa: BLE001 - OSError, AdapterError, and safetensors' own error types
                log.warning("skipping unreadable stored submission %s: %s", path, err)
        return pending
