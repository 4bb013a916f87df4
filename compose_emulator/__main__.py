"""`python -m compose_emulator up -f FILE [-f OVERRIDE] [--root DIR]`: bring a compose project up in namespaces."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from compose_emulator.netns import DEFAULT_SUBNET, netns_unavailable_reason
from compose_emulator.runner import ComposeRun
from compose_emulator.spec import ComposeError, load_project


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose_emulator", description=__doc__)
    parser.add_argument("command", choices=["up", "config"], help="up: run the project; config: print the plan")
    parser.add_argument("-f", "--file", action="append", type=Path, required=True, help="compose file (repeatable)")
    parser.add_argument("--root", type=Path, default=None, help="directory for volumes and logs (default: a temp dir)")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help="private subnet of the service addresses")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is stopped")
    args = parser.parse_args(argv)
    try:
        project = load_project(args.file, os.environ)
    except (ComposeError, OSError) as err:
        print(f"compose_emulator: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        for name in project.start_order():
            service = project.services[name]
            print(f"{name}: {' '.join(service.argv)}  depends_on={service.depends_on or {}}")
        return 0
    reason = netns_unavailable_reason()
    if reason:
        print(f"compose_emulator: cannot create network namespaces here: {reason}", file=sys.stderr)
        return 2
    root = args.root or Path(tempfile.mkdtemp(prefix="compose-emulator-"))
    with ComposeRun(project, root, os.environ, args.subnet, args.timeout) as run:
        print("services: " + ", ".join(f"{n}={run.address(n)}" for n in run.order) + f"; logs in {root}/logs")
        result = run.wait()
    for name, code in result.exit_codes.items():
        print(f"{name}: exited with code {code}")
    if result.failure:
        print(f"compose_emulator: {result.failure}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
