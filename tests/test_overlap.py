"""Client overlap: preparing the next batch while the server works changes nothing."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from common.builtin import build_builtin_tokenizer
from common.data import BatchStream, encode, synthetic_e2e
from common.seeding import seed_step
from common.split.parts import SplitPart
from splitlora_client.config import TrainConfig
from splitlora_client.prefetch import StepPreparer
from splitlora_client.trainer import train
from splitlora_server.app import start_server
from splitlora_server.config import ServeConfig


def _run(out: Path, overlap: bool) -> tuple[dict, dict]:
    running = start_server(ServeConfig(port=0, clients=1, rounds=2, local_steps=3, batch_size=4, warmup_steps=1,
                                       learning_rate=5e-3, seed=3, output=str(out / "server"), insecure=True))
    try:  # the built-in model and LoRA have dropout on: the random draws must line up too
        client = train(TrainConfig(server=f"127.0.0.1:{running.port}", client_id="solo", seed=3, progress=False,
                                   output=str(out / "solo"), builtin_examples=32, overlap=overlap,
                                   insecure=True))
        assert running.wait_finished()
        whole = running.export()
    finally:
        running.stop(grace=0)
    return load_file(str(client)), load_file(str(whole / "adapter_model.safetensors"))


def test_overlap_on_and_off_train_the_same_adapters(tmp_path: Path, builtin_model_dir: Path):
    on, off = _run(tmp_path / "on", True), _run(tmp_path / "off", False)
    for a, b in zip(on, off):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepared_steps_draw_the_same_dropout_masks(builtin_model_dir: Path):
    part = SplitPart(builtin_model_dir, "client", 3).train()  # dropout in the embedding, blocks and LoRA
    tokenizer = build_builtin_tokenizer()
    encoded = [encode(tokenizer, ex, 64) for ex in synthetic_e2e(8, seed=1)]
    direct, stream = [], BatchStream(encoded, 4, tokenizer.pad_token_id, seed=2)
    for step in range(2):  # what the loop did before overlap existed
        seed_step(9, "client", "c", step)
        batch = stream.next_batch()
        direct.append(part(batch["input_ids"], batch["attention_mask"], batch["position_ids"]))
    prep = StepPreparer(part, BatchStream(encoded, 4, tokenizer.pad_token_id, seed=2), 9, "c")
    first = prep.prepare(0)
    hidden0 = prep.forward(first)
    second = prep.prepare(1)  # prepared before step 0 is finished
    torch.manual_seed(123), torch.rand(100)  # e.g. a server in this process seeding and drawing meanwhile
    hidden1 = prep.forward(second)
    assert torch.equal(hidden0, direct[0]) and torch.equal(hidden1, direct[1])
