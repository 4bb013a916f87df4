"""With the same seeds, a CPU run is reproducible: the same adapters, bit for bit."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.support.solo import solo_run


def test_same_seed_same_adapters(tmp_path: Path, builtin_model_dir: Path):
    client_a, whole_a = solo_run(tmp_path / "a", seed=7)
    client_b, whole_b = solo_run(tmp_path / "b", seed=7)
    assert client_a.keys() == client_b.keys() and whole_a.keys() == whole_b.keys()
    assert all(torch.equal(client_a[k], client_b[k]) for k in client_a)
    assert all(torch.equal(whole_a[k], whole_b[k]) for k in whole_a)
    _, whole_c = solo_run(tmp_path / "c", seed=8)
    assert any(not torch.equal(whole_a[k], whole_c[k]) for k in whole_a)
