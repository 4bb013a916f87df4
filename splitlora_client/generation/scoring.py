"""Validation loss through the split without learning anything: the client part in eval mode, no gradients, and
the server's forward-only Score (no backward, no optimizer step on either side)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import grpc
import torch

from common.data import Encoded, collate
from common.rpc.splitlora.v1 import generation_pb2 as gpb
from common.rpc.splitlora.v1 import generation_pb2_grpc as ggrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.parts import SplitPart
from common.loss import summed_loss
from common.wire import decode_tensor, encode_tensor
from splitlora_client.generation.remote import ADAPTERS
from splitlora_client.session import CLIENT_ID_KEY


@dataclass(frozen=True)
class Validation:
    """Mean next-token cross-entropy over the target tokens of a data set, and its perplexity."""

    loss: float
    tokens: int
    samples: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def validate(part: SplitPart, channel: grpc.Channel, client_id: str, encoded: Sequence[Encoded], batch_size: int,
             pad_id: int, fingerprint: spb.Fingerprint, adapter: str = "shared", round: int = -1, codec: int = 1,
             timeout: float = 600.0, top: SplitPart | None = None) -> Validation:
    """Score `encoded` in batches through the split. With `round` >= 0 the server counts the result in that
    round's sample-weighted validation loss of all clients. `top`: u-shape, the client's top part: the labels stay
    here, the server answers its blocks' output and the loss is computed on the client (the server counts none)."""
    if not encoded:
        raise ValueError("no examples to evaluate")
    stub = ggrpc.SplitGenerationStub(channel)
    held = [p for p in (part, top) if p is not None]
    was_training = [p.training for p in held]
    for p in held:
        p.eval()
    loss_sum, tokens = 0.0, 0
    try:
        for start in range(0, len(encoded), batch_size):
            items = encoded[start:start + batch_size]
            batch = collate(items, pad_id)
            with torch.no_grad():
                hidden = part(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            request = gpb.ScoreRequest(adapter=ADAPTERS[adapter], hidden=encode_tensor(hidden, codec),
                                       attention_mask=encode_tensor(batch["attention_mask"]),
                                       position_ids=encode_tensor(batch["position_ids"]), round=round,
                                       samples=len(items), last=start + batch_size >= len(encoded),
                                       fingerprint=fingerprint)
            if top is None:
                request.labels.CopyFrom(encode_tensor(batch["labels"]))
            reply = stub.Score(request, metadata=[(CLIENT_ID_KEY, client_id)], timeout=timeout)
            batch_sum, batch_tokens = (reply.loss_sum, reply.tokens) if top is None else _top_loss(top, reply, batch)
            loss_sum, tokens = loss_sum + batch_sum, tokens + batch_tokens
    finally:
        for p, mode in zip(held, was_training):
            p.train(mode)
    return Validation(loss_sum / tokens if tokens else math.nan, tokens, len(encoded))


@torch.no_grad()
def _top_loss(top: SplitPart, reply: gpb.ScoreReply, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """U-shape: the summed loss of the batch's labels from the server's top-cut activations, on the client."""
    if not reply.HasField("hidden"):
        raise RuntimeError("the server answered a loss, not its top-cut activations: does it run --split-mode "
                           "u-shape?")
    logits = top(decode_tensor(reply.hidden, name="hidden"), batch["attention_mask"], batch["position_ids"])
    return summed_loss(logits, batch["labels"])


class RoundValidator:
    """`--eval-data` during training: the validation loss of the global model every `every` rounds (and after
    the last), reported to the server for its sample-weighted loss of all clients."""

    def __init__(self, part: SplitPart, channel: grpc.Channel, client_id: str, encoded: Sequence[Encoded],
                 batch_size: int, pad_id: int, fingerprint: spb.Fingerprint, every: int, rounds: int,
                 top: SplitPart | None = None) -> None:
        self.part, self.channel, self.client_id, self.encoded, self.top = part, channel, client_id, encoded, top
        self.batch_size, self.pad_id, self.fingerprint = batch_size, pad_id, fingerprint
        self.every, self.rounds = max(1, every), rounds

    def due(self, closed_round: int) -> bool:
        """Whether the global model after `closed_round` is evaluated."""
        return (closed_round + 1) % self.every == 0 or closed_round + 1 == self.rounds

    def run(self, closed_round: int) -> Validation:
        """Score the held-out data with the global model of `closed_round` (the client part holds it now)."""
        return validate(self.part, self.channel, self.client_id, self.encoded, self.batch_size, self.pad_id,
                        self.fingerprint, round=closed_round, top=self.top)
