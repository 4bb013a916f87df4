"""Shared fixtures: tiny models saved to temp dirs and loaded through the real path, a private SPLITLORA_HOME,
and in-process servers on loopback."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from common.builtin import build_tiny_model, ensure_builtin_model


@pytest.fixture(scope="session", autouse=True)
def splitlora_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every process it starts) builds the built-in model under a private home."""
    home = Path(os.environ.get("SPLITLORA_TEST_HOME") or tmp_path_factory.mktemp("splitlora-home"))
    os.environ["SPLITLORA_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def builtin_model_dir(splitlora_home: Path) -> Path:
    """The built-in tiny GPT-2 (6 blocks, 128 wide) with its word-level tokenizer."""
    return ensure_builtin_model(splitlora_home)


@pytest.fixture(scope="session")
def no_dropout_model(tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path) -> Path:
    """The built-in model without dropout: dropout masks are drawn per micro-batch, so equality needs it off."""
    path = tmp_path_factory.mktemp("no-dropout")
    for f in builtin_model_dir.iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    config = json.loads((path / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block, 32-wide GPT-2 without dropout, saved as safetensors (for exact split == unsplit checks)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = build_tiny_model(96, seed=1, n_layer=4, n_embd=32, n_head=4, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def deployment_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates made by the certs helper: CA, server (localhost, 127.0.0.1), alice, bob, carol and admin."""
    from splitlora_server.ops.certs import CertsConfig, make_certs

    path = tmp_path_factory.mktemp("certs")
    make_certs(CertsConfig(output=str(path), server_names=["localhost", "127.0.0.1"],
                           clients=["alice", "bob", "carol"], days=2))
    return path


@pytest.fixture(scope="session")
def rogue_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA's certificates with the same names: what an impostor could make for itself."""
    from splitlora_server.ops.certs import CertsConfig, make_certs

    path = tmp_path_factory.mktemp("rogue-certs")
    make_certs(CertsConfig(output=str(path), clients=["alice"], days=2))
    return path
