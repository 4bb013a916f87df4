"""Write the docker demo's data shards (docker/data/<client>.txt): synthetic E2E-style lines, IID thirds.

`--check` fails if the committed files differ from what this script writes (a test runs it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.data import shard, synthetic_e2e, write_examples  # noqa: E402

CLIENTS = ("alice", "bob", "carol")
EXAMPLES, SEED = 600, 7


def write(directory: Path) -> list[Path]:
    """One shard per client, in `directory`."""
    examples = synthetic_e2e(EXAMPLES, seed=SEED)
    paths = []
    for index, name in enumerate(CLIENTS):
        path = directory / f"{name}.txt"
        write_examples(path, shard(examples, index, len(CLIENTS)))
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=ROOT / "docker" / "data")
    parser.add_argument("--check", action="store_true", help="compare with the files in --output instead")
    args = parser.parse_args()
    if not args.check:
        for path in write(args.output):
            print(path)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [p.name for p in write(Path(tmp)) if not (args.output / p.name).is_file()
                 or (args.output / p.name).read_bytes() != p.read_bytes()]
    if stale:
        print(f"out of date: {stale}; run python scripts/make_demo_data.py", file=sys.stderr)
        return 1
    print("demo data matches the generator")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
