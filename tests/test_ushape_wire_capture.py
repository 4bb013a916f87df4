"""Labels stay home: every message the server receives in u-shape training (captured as serialized on the client's
channel) holds no label, no logit and no token id; in standard mode the same capture finds the labels, so the
check can fail."""
from __future__ import annotations

from pathlib import Path

import grpc
import torch
from google.protobuf.message import Message

import splitlora_client.trainer as trainer
from splitlora_bench.privacy_wire import Capture
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.wire import decode_tensor
from splitlora_client.local import load_local
from splitlora_client.options import TrainConfig
from splitlora_server.app import start_server
from splitlora_server.options import ServeConfig

INT_DTYPES = {tpb.DTYPE_INT64, tpb.DTYPE_INT32, tpb.DTYPE_INT8, tpb.DTYPE_UINT8, tpb.DTYPE_BOOL}


def _tensors(msg: Message, path: str = ""):
    """Every Tensor inside `msg`, with its field path."""
    if isinstance(msg, tpb.Tensor):
        yield path, msg
        return
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        values = [value] if isinstance(value, Message) else list(value)
        for v in values:
            if isinstance(v, Message):
                yield from _tensors(v, f"{path}.{field.name}")


def _train(tmp: Path, split_mode: str) -> tuple[Capture, TrainConfig]:
    capture = Capture()
    u = {"split_mode": split_mode, "top_blocks": 1 if split_mode == "u-shape" else 0, "split_layer": 2}
    running = start_server(ServeConfig(port=0, clients=1, rounds=2, local_steps=2, batch_size=4, warmup_steps=1,
                                       output=str(tmp / "server"), insecure=True, **u))
    cfg = TrainConfig(server=f"127.0.0.1:{running.port}", client_id="solo", output=str(tmp / "solo"),
                      progress=False, builtin_examples=8, insecure=True)  # the split mode, K and J: the server's plan
    try:
        trainer.train(cfg, observe=lambda channel: grpc.intercept_channel(channel, capture))
        assert running.wait_finished()
        assert (cfg.split_mode, cfg.top_blocks, cfg.split_layer) == (split_mode, u["top_blocks"], 2)
    finally:
        running.stop(grace=0)
    return capture, cfg


def _windows(cfg: TrainConfig, n: int = 4) -> set[bytes]:
    """Byte patterns of every run of n consecutive target ids of the client's data, as int32 and int64."""
    out = set()
    for ids, labels in load_local(cfg).encoded(512):
        targets = [t for t in labels if t >= 0]
        for i in range(len(targets) - n + 1):
            window = torch.tensor(targets[i:i + n])
            out |= {window.to(torch.int32).numpy().tobytes(), window.numpy().tobytes()}
    return out


def _leaks(capture: Capture, cfg: TrainConfig, vocab: int) -> list[str]:
    windows, found = _windows(cfg), []
    for method, msg in capture.messages():
        raw = msg.SerializeToString()
        if any(w in raw for w in windows):
            found.append(f"{method}: target token ids in the bytes")
        for path, tensor in _tensors(msg):
            if path.endswith("labels"):
                found.append(f"{method}: a labels tensor at {path}")
            if tensor.dtype in INT_DTYPES and not path.endswith(("attention_mask", "position_ids")):
                found.append(f"{method}: an integer tensor at {path}")
            if tensor.shape and tensor.shape[-1] == vocab:
                found.append(f"{method}: a vocabulary-sized tensor (logits?) at {path}")
            if path.endswith("attention_mask") and not set(decode_tensor(tensor).unique().tolist()) <= {0, 1}:
                found.append(f"{method}: attention_mask holds more than 0/1")
    return found


def test_u_shape_server_receives_no_label_logit_or_token_id(tmp_path: Path) -> None:
    capture, cfg = _train(tmp_path / "u", "u-shape")
    methods = [m for m, _ in capture.sent]
    assert any(m.endswith("/Train") for m in methods) and any(m.endswith("/Submit") for m in methods)
    frames = [msg.WhichOneof("kind") for m, msg in capture.messages() if m.endswith("/Train")]
    assert frames.count("forward") == frames.count("top_grad") == 4  # 2 rounds x 2 steps, two exchanges each
    vocab = int(trainer.SplitPart(cfg.model_dir(), "client", 2).vocab_size)
    assert _leaks(capture, cfg, vocab) == []


def test_the_capture_finds_the_labels_of_standard_mode(tmp_path: Path) -> None:
    capture, cfg = _train(tmp_path / "std", "standard")
    vocab = int(trainer.SplitPart(cfg.model_dir(), "client", 2).vocab_size)
    leaks = _leaks(capture, cfg, vocab)
    assert any("labels tensor" in leak for leak in leaks) and any("target token ids" in leak for leak in leaks)
