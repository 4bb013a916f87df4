"""Client overlap: preparing the next batch (and its embedding) while the server works changes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.builtin import build_builtin_tokenizer, build_tiny_model
from common.data import BatchStream, encode, synthetic_e2e
from common.seeding import seed_step
from common.split.parts import LoraSettings, SplitPart
from splitlora_client.config import TrainConfig
from splitlora_client.prefetch import StepPreparer, embeddings_frozen
from splitlora_client.trainer import train
from splitlora_server.app import start_server
from splitlora_server.config import ServeConfig


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tokenizer with a tiny GPT-2 without dropout: nothing random, whatever the thread timing."""
    path = tmp_path_factory.mktemp("no-dropout")
    tokenizer = build_builtin_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_model(len(tokenizer), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(path)
    return path


def _run(out: Path, model: Path, overlap: bool) -> tuple[dict, dict]:
    # Server and client share this process and so torch's global generator: dropout stays off here, and
    # the random draws are checked on their own below.
    lora = {"model": str(model), "lora_dropout": 0.0}
    running = start_server(ServeConfig(port=0, clients=1, rounds=2, local_steps=3, batch_size=4, warmup_steps=1,
                                       learning_rate=5e-3, seed=3, output=str(out / "server"), **lora))
    try:
        client = train(TrainConfig(server=f"127.0.0.1:{running.port}", client_id="solo", seed=3, progress=False,
                                   output=str(out / "solo"), builtin_examples=32, overlap=overlap, **lora))
        assert running.wait_finished()
        whole = running.export()
    finally:
        running.stop(grace=0)
    return load_file(str(client)), load_file(str(whole / "adapter_model.safetensors"))


def test_overlap_on_and_off_train_the_same_adapters(tmp_path: Path, no_dropout_model: Path):
    on, off = _run(tmp_path / "on", no_dropout_model, True), _run(tmp_path / "off", no_dropout_model, False)
    for a, b in zip(on, off):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepared_steps_draw_the_same_dropout_masks(builtin_model_dir: Path):
    part = SplitPart(builtin_model_dir, "client", 3).train()  # dropout in the embedding, blocks and LoRA
    tokenizer = build_builtin_tokenizer()
    encoded = [encode(tokenizer, ex, 64) for ex in synthetic_e2e(8, seed=1)]
    direct, stream = [], BatchStream(encoded, 4, tokenizer.pad_token_id, seed=2)
    for step in range(2):  # what the loop does without overlap
        seed_step(9, "client", "c", step)
        batch = stream.next_batch()
        direct.append(part(batch["input_ids"], batch["attention_mask"], batch["position_ids"]))
    prep = StepPreparer(part, BatchStream(encoded, 4, tokenizer.pad_token_id, seed=2), 9, "c")
    first = prep.prepare(0)
    hidden0 = prep.forward(first)
    second = prep.prepare(1)  # prepared before step 0 is finished
    torch.rand(100)  # anything else drawing in between (here: nothing the real loop does)
    hidden1 = prep.forward(second)
    assert torch.equal(hidden0, direct[0]) and torch.equal(hidden1, direct[1])


def test_embeddings_count_as_trainable_when_lora_targets_them(builtin_model_dir: Path):
    assert embeddings_frozen(SplitPart(builtin_model_dir, "client", 3))
    adapted = SplitPart(builtin_model_dir, "client", 3, LoraSettings(targets=("c_attn", "wte")))
    assert not embeddings_frozen(adapted)  # then only the collation is prepared early
