"""Loading real checkpoints: sharded == single-file on both sides, each side reads only its own tensors,
fingerprints agree across layouts, and a hub id that cannot be fetched gets one clear error."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

import common.weights as checkpoint
from common.fingerprint import compute_fingerprint
from common.split.parts import SplitPart, side_tensor_names
from common.weights import CheckpointError, CheckpointIndex, resolve_model_dir
from tests.support.families import FAMILIES, VOCAB, checkpoint_dir
from tests.support.split_reference import EXACT, padded_batch, split_loss

SPLIT = 2
BATCH = padded_batch(VOCAB)


def _server_owned(name: str, family: str) -> bool:
    """Whether a checkpoint tensor belongs to the server at SPLIT (blocks >= SPLIT, final norm, head)."""
    block = re.search(r"\.(?:h|layers)\.(\d+)\.", name)
    if block:
        return int(block.group(1)) >= SPLIT
    return any(k in name for k in ("ln_f", "model.norm", "final_layer_norm", "lm_head", "embed_out"))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads_on_both_sides_like_a_single_file(family: str) -> None:
    sharded = checkpoint_dir(family, sharded=True)
    assert (sharded / checkpoint.INDEX_FILE).is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    single = [SplitPart(checkpoint_dir(family), side, SPLIT, EXACT).eval() for side in ("client", "server")]
    parts = [SplitPart(sharded, side, SPLIT, EXACT).eval() for side in ("client", "server")]
    for a, b in zip(single, parts):
        assert a.state_dict().keys() == b.state_dict().keys()
        for name, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[name]), name
    assert torch.equal(split_loss(*parts, BATCH), split_loss(*single, BATCH))


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_is_the_same_for_sharded_and_single_file(family: str) -> None:
    single = compute_fingerprint(checkpoint_dir(family), SPLIT, EXACT)
    sharded = compute_fingerprint(checkpoint_dir(family, sharded=True), SPLIT, EXACT)
    assert single == sharded and single.family == family


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_side_reads_only_its_own_tensors(family: str, side: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameter names and the tensors (and shards) read: the client never touches a server weight, and the
    server never touches a client-only weight (a tied head legitimately reads the embedding)."""
    model_dir = checkpoint_dir(family, sharded=True)
    read: list[str] = []
    opened: set[str] = set()
    real_load, real_open = CheckpointIndex.load, checkpoint.safe_open
    monkeypatch.setattr(CheckpointIndex, "load", lambda self, names, *a, **k: read.extend(names) or
                        real_load(self, names, *a, **k))
    monkeypatch.setattr(checkpoint, "safe_open", lambda file, *a, **k: opened.add(Path(file).name) or
                        real_open(file, *a, **k))
    part = SplitPart(model_dir, side, SPLIT, EXACT)
    assert sorted(read) == side_tensor_names(model_dir, side, SPLIT)
    index = CheckpointIndex(model_dir)
    assert opened == {index.tensors[n].file.name for n in read}
    owned = [n for n in read if _server_owned(n, family)]
    if side == "client":
        assert owned == []
        assert not [n for n, _ in part.named_parameters() if _server_owned(n, family)]
    else:
        tie = {part.family.tied_head[1]} if part.family.ties_head(part.config) else set()  # Qwen2, Gemma, GPT-2
        assert set(read) - set(owned) <= tie
    assert all(not p.is_meta for p in part.parameters())


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    model_dir = shutil.copytree(checkpoint_dir("llama", sharded=True), tmp_path / "m")
    next(model_dir.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard model-00002-.*, which is missing"):
        SplitPart(model_dir, "client", SPLIT, EXACT)


def test_index_disagreeing_with_the_shards(tmp_path: Path) -> None:
    model_dir = shutil.copytree(checkpoint_dir("llama", sharded=True), tmp_path / "m")
    index_file = model_dir / checkpoint.INDEX_FILE
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"]["lm_head.weight"] = next(f for f in files if f != index["weight_map"]["lm_head.weight"])
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="places tensor lm_head.weight in .*that shard does not hold it"):
        CheckpointIndex(model_dir)


def test_local_directory_is_used_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub was asked"))
    assert resolve_model_dir(str(checkpoint_dir("llama"))) == checkpoint_dir("llama")


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no-such-dir"])
def test_missing_local_path_is_not_sent_to_the_hub(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub was asked"))
    with pytest.raises(CheckpointError, match=f"model '{re.escape(name)}' is not a local directory .*no such "
                                              "directory.*pass a local directory"):
        resolve_model_dir(name)


def test_hub_id_downloads_a_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name, **kw: calls.append((name, kw)) or str(checkpoint_dir("qwen2")))
    checkpoint._download.cache_clear()
    part = SplitPart("someone/tiny-qwen2", "client", SPLIT, EXACT)
    assert part.model_dir == checkpoint_dir("qwen2")
    assert calls[0] == ("someone/tiny-qwen2", {"allow_patterns": checkpoint.HUB_PATTERNS})
    assert "*.safetensors" in checkpoint.HUB_PATTERNS and "*.bin" not in checkpoint.HUB_PATTERNS
    checkpoint._download.cache_clear()


def test_hub_id_offline_gives_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    expected = ("model 'splitlora-tests/no-such-model' is not a local directory and could not be downloaded from "
                "the Hugging Face hub: offline or the hub is unreachable, and no cached copy was found; "
                "pass a local directory")
    with pytest.raises(CheckpointError) as info:
        SplitPart("splitlora-tests/no-such-model", "server", SPLIT, EXACT)
    assert str(info.value) == expected
    assert info.value.__suppress_context__ and info.value.__cause__ is None  # no chained hub stack trace

