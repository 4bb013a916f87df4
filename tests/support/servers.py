"""Shared helpers for tests that talk to a real split server over gRPC on loopback.

- `running_server(...)`: start `splitlora_server.app.start_server` on 127.0.0.1:0 with the built-in model and a
  small schedule, yield a `Harness` (server, channel, stub), stop everything afterwards.
- `join(...)`: Join with the server's own fingerprint (or a given one) and return the reply + call metadata.
- `ClientSide`: a real client part and real batches of the built-in synthetic data; `forward(...)` returns a
  valid `StepForward` for a given step.
- `exchange(...)`: send frames over one Train stream and collect the server's answers (reassembling FrameParts)
  and the error that ended the stream, if any.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc
import torch
from transformers import AutoTokenizer

from common.data import collate, encode, synthetic_e2e
from common.fingerprint import compute_fingerprint
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.split.parts import LoraSettings, SplitPart
from common.tls import ClientTlsOptions, open_channel
from common.wire import Reassembler, decode_tensor, encode_tensor
from splitlora_server.app import RunningServer, start_server
from splitlora_server.options import ServeConfig
from splitlora_server.service import CLIENT_ID_KEY, SESSION_KEY

# A small schedule that trains in well under a second per round on the built-in model.
SMALL_SCHEDULE: dict[str, object] = {"clients": 2, "rounds": 2, "local_steps": 3, "batch_size": 4,
                                     "warmup_steps": 1, "finish_grace_seconds": 0.0, "max_workers": 16}
RPC_TIMEOUT = 30.0


def serve_config(model_dir: Path, output: Path, **overrides: object) -> ServeConfig:
    """A ServeConfig for the built-in model on 127.0.0.1:0 with the small schedule (plus `overrides`); plaintext
    unless the overrides give TLS files."""
    tls = any(k.startswith("tls_") for k in overrides)
    values = {"model": str(model_dir), "host": "127.0.0.1", "port": 0, "output": str(output), "insecure": not tls,
              **SMALL_SCHEDULE, **overrides}
    cfg = ServeConfig(**values)  # type: ignore[arg-type]
    cfg.validate()
    return cfg


@dataclass
class Harness:
    """A running server and a loopback channel to it."""

    running: RunningServer
    channel: grpc.Channel
    stub: sgrpc.SplitTrainingStub

    @property
    def config(self) -> ServeConfig:
        return self.running.config

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def status(self) -> spb.StatusReply:
        return self.stub.Status(spb.StatusRequest(), timeout=RPC_TIMEOUT)

    def client_status(self, client_id: str) -> spb.ClientStatus:
        """The Status entry of one client (AssertionError if the server does not list it)."""
        for client in self.status().clients:
            if client.client_id == client_id:
                return client
        raise AssertionError(f"client {client_id!r} is not in the server's status")


@contextmanager
def running_server(model_dir: Path, output: Path, client_tls: ClientTlsOptions | None = None,
                   **overrides: object) -> Iterator[Harness]:
    """Start a split server from `serve_config(model_dir, output, **overrides)`; stop it on exit. The harness
    channel connects with `client_tls` (default: plaintext)."""
    cfg = serve_config(model_dir, output, **overrides)
    running = start_server(cfg)
    # The client side of the channel accepts anything the server may send; tests that need a limit set their own.
    channel = open_channel(f"127.0.0.1:{running.port}", client_tls or ClientTlsOptions(insecure=True),
                           options=[("grpc.max_receive_message_length", 256 << 20),
                                    ("grpc.max_send_message_length", 256 << 20)])
    try:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
        yield Harness(running, channel, sgrpc.SplitTrainingStub(channel))
    finally:
        channel.close()
        running.stop(grace=0.5)


# -- handshake -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def fingerprint_for(model_dir: str, split_layer: int = 3, lora: LoraSettings = LoraSettings(), u_shape: bool = False,
                    top_blocks: int = 0) -> spb.Fingerprint:
    """The fingerprint a client with this model, split and LoRA config sends (cached; treat as read-only)."""
    return compute_fingerprint(model_dir, split_layer, lora, u_shape, top_blocks)


def server_fingerprint(harness: Harness) -> spb.Fingerprint:
    """The fingerprint a client matching the server's configuration sends."""
    cfg = harness.config
    return fingerprint_for(str(harness.running.part.model_dir), cfg.split_layer, cfg.lora_settings(), cfg.u_shape,
                           cfg.top_blocks)


def metadata(client_id: str, session: str) -> list[tuple[str, str]]:
    """Call metadata of the Train stream."""
    return [(CLIENT_ID_KEY, client_id), (SESSION_KEY, session)]


@dataclass
class Joined:
    """A client that joined: the server's reply and the metadata its Train calls carry."""

    client_id: str
    reply: spb.JoinReply
    metadata: list[tuple[str, str]] = field(default_factory=list)


def join(harness: Harness, client_id: str, fingerprint: spb.Fingerprint | None = None,
         codecs: Sequence[int] = (tpb.CODEC_RAW,), stub: sgrpc.SplitTrainingStub | None = None) -> Joined:
    """Join as `client_id` (with the server's own fingerprint unless one is given) through the harness channel
    or `stub`; RpcError if refused."""
    fp = fingerprint if fingerprint is not None else server_fingerprint(harness)
    reply = (stub or harness.stub).Join(spb.JoinRequest(client_id=client_id, fingerprint=fp, codecs=list(codecs)),
                                        timeout=RPC_TIMEOUT)
    return Joined(client_id, reply, metadata(client_id, reply.session))


# -- the client side -----------------------------------------------------------------------------------------
class ClientSide:
    """A real client part of the built-in model and real batches of the built-in synthetic data."""

    def __init__(self, model_dir: Path, split_layer: int = 3, lora: LoraSettings = LoraSettings(),
                 lora_seed: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.part = SplitPart(model_dir, "client", split_layer, lora, lora_seed=lora_seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    def batch(self, size: int = 4, seed: int = 0, max_len: int = 128, min_width: int = 0
              ) -> dict[str, torch.Tensor]:
        """A collated batch of `size` synthetic examples; right-padded to at least `min_width` tokens."""
        encoded = [encode(self.tokenizer, ex, max_len) for ex in synthetic_e2e(size, seed=seed)]
        width = max(len(ids) for ids, _ in encoded)
        if width < min_width:  # pad the first row's labels only with -100 so it stays a valid example
            ids, labels = encoded[0]
            pad = [self.tokenizer.pad_token_id] * (min_width - len(ids))
            encoded[0] = (ids + pad, labels + [-100] * len(pad))
        return collate(encoded, self.tokenizer.pad_token_id)

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cut activations of `batch`, deterministic (eval mode: no dropout, no RNG use) and detached."""
        was_training = self.part.training
        self.part.eval()
        try:
            with torch.no_grad():
                return self.part(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).detach()
        finally:
            self.part.train(was_training)


def step_forward(step: int, rnd: int, hidden: torch.Tensor, batch: dict[str, torch.Tensor],
                 codec: int = tpb.CODEC_RAW) -> spb.StepForward:
    """The StepForward a client sends for `step` of round `rnd`."""
    return spb.StepForward(step=step, round=rnd, hidden=encode_tensor(hidden, codec),
                           attention_mask=encode_tensor(batch["attention_mask"]),
                           labels=encode_tensor(batch["labels"]), position_ids=encode_tensor(batch["position_ids"]))


def valid_forward(client: ClientSide, step: int, local_steps: int, batch_size: int = 4, seed: int | None = None,
                  codec: int = tpb.CODEC_RAW, min_width: int = 0) -> spb.StepForward:
    """A valid StepForward for `step`: a real batch (seeded by the step unless `seed` is given) through the real
    client part."""
    batch = client.batch(batch_size, seed=step if seed is None else seed, min_width=min_width)
    return step_forward(step, step // local_steps, client.hidden(batch), batch, codec)


# -- the training stream -------------------------------------------------------------------------------------
def server_frames(harness: Harness, md: Sequence[tuple[str, str]] | None, frames: Iterable[spb.ClientFrame],
                  timeout: float = RPC_TIMEOUT) -> tuple[list[spb.ServerFrame], grpc.RpcError | None]:
    """Send `frames` over one Train stream; return the server's frames (pieces reassembled, every kind) and the
    error that ended the stream (None when it ended cleanly)."""
    replies: list[spb.ServerFrame] = []
    parts = Reassembler(max_bytes=1 << 30)
    call = harness.stub.Train(iter(list(frames)), metadata=md, timeout=timeout)
    try:
        for out in call:
            whole = parts.whole(out, spb.ServerFrame.FromString)
            if whole is not None:
                replies.append(whole)
    except grpc.RpcError as err:
        return replies, err
    return replies, None


def exchange(harness: Harness, md: Sequence[tuple[str, str]] | None, frames: Iterable[spb.ClientFrame],
             timeout: float = RPC_TIMEOUT) -> tuple[list[spb.StepBackward], grpc.RpcError | None]:
    """Send `frames` over one Train stream; return the StepBackwards received and the error that ended the stream
    (None when it ended cleanly)."""
    replies, err = server_frames(harness, md, frames, timeout)
    return [out.backward for out in replies], err


def train_ok(harness: Harness, md: Sequence[tuple[str, str]], *forwards: spb.StepForward) -> list[spb.StepBackward]:
    """Send valid steps over one stream; every one must be answered."""
    replies, err = exchange(harness, md, [spb.ClientFrame(forward=f) for f in forwards])
    assert err is None, f"the server refused a valid step: {err.code()} {err.details()}"
    assert [r.step for r in replies] == [f.step for f in forwards]
    return replies


def grad_of(reply: spb.StepBackward) -> torch.Tensor:
    """The decoded gradient of a server answer."""
    return decode_tensor(reply.grad, name="grad")


# -- a client that trains ------------------------------------------------------------------------------------
def train_steps(session, client: ClientSide, local_steps: int, lr: float, batch_size: int = 4,
                seed: int = 100) -> Iterator[float]:
    """Train round 0 through a joined `SplitSession`: `local_steps` steps of real batches (seeded `seed + step`)
    with AdamW on the client part's LoRA parameters; yield each step's loss once the optimiser has stepped."""
    params = [p for p in client.part.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(local_steps):
        batch = client.batch(batch_size, seed=seed + step)
        hidden = client.part(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        result = session.step(step, 0, hidden.detach(), batch["attention_mask"], batch["labels"],
                              batch["position_ids"])
        hidden.backward(result.grad)
        opt.step()
        opt.zero_grad()
        yield result.loss
