"""Regenerate the gRPC stubs in common/rpc from proto/ (the one way to produce them)."""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "common" / "rpc"
PACKAGE = "common.rpc"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto under proto/ and rewrite imports to live under common.rpc."""
    from grpc_tools import protoc  # imported lazily: only needed to regenerate

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    stubs = [p for p in out_dir.rglob("*_pb2*.py*") if p.suffix in (".py", ".pyi")]  # not __pycache__/*.pyc
    for path in sorted(stubs):
        text = path.read_text()
        text = re.sub(r"^from splitlora\.v1 import", f"from {PACKAGE}.splitlora.v1 import", text, flags=re.M)
        text = re.sub(r"^import splitlora\.v1\.", f"import {PACKAGE}.splitlora.v1.", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    for pkg in (out_dir / "splitlora", out_dir / "splitlora" / "v1"):
        (pkg / "__init__.py").touch()
    return written


def main() -> None:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = {p.relative_to(tmp): p.read_text() for p in generate(Path(tmp))}
        stale = [str(rel) for rel, text in fresh.items()
                 if not (OUT_DIR / rel).exists() or (OUT_DIR / rel).read_text() != text]
        if stale:
            raise SystemExit(f"stubs out of date: {stale}; run python scripts/gen_protos.py")
        print("stubs match the protos")
        return
    for path in generate(OUT_DIR):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
