"""The committed stubs are exactly what scripts/gen_protos.py produces from proto/."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos():
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stubs match the protos" in result.stdout


def test_common_never_imports_a_role_package():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "common").rglob("*.py")
                 if "splitlora_server" in p.read_text() or "splitlora_client" in p.read_text()]
    assert offenders == []


def test_roles_never_import_each_other():
    for role, other in (("splitlora_server", "splitlora_client"), ("splitlora_client", "splitlora_server")):
        offenders = [str(p) for p in (ROOT / role).rglob("*.py") if f"import {other}" in p.read_text()
                     or f"from {other}" in p.read_text()]
        assert offenders == []
