"""The client's side of an inference session: one Generate stream, one request and one answer per step."""
from __future__ import annotations

import queue
from dataclasses import dataclass

import grpc
import torch

from common.rpc.splitlora.v1 import generation_pb2 as gpb
from common.rpc.splitlora.v1 import generation_pb2_grpc as ggrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.wire import Reassembler, chunked, decode_tensor, encode_tensor
from splitlora_client.session import CLIENT_ID_KEY

ADAPTERS = {"shared": gpb.SERVER_ADAPTER_SHARED, "own": gpb.SERVER_ADAPTER_OWN, "none": gpb.SERVER_ADAPTER_NONE}


@dataclass
class Answer:
    """What the server sent for one step: (rows, vocab) scores of the next token (logits, or log-probabilities
    with -inf outside the top k), or the hidden state at the second cut; and the bytes of both messages."""

    scores: torch.Tensor
    bytes_sent: int
    bytes_received: int


class RemoteSession:
    """Open an inference session on the server and step it; closing the stream frees the server's cache."""

    def __init__(self, channel: grpc.Channel, client_id: str, adapter: str = "shared", reply: str = "logits",
                 top_k: int = 0, max_tokens: int = 0, chunk_bytes: int = 4 << 20, vocab_size: int = 0,
                 fingerprint: spb.Fingerprint | None = None) -> None:
        self.stub = ggrpc.SplitGenerationStub(channel)
        self._requests: queue.Queue = queue.Queue()
        self._chunk, self._vocab, self._step = chunk_bytes, vocab_size, 0
        self._call = self.stub.Generate(iter(self._requests.get, None), metadata=[(CLIENT_ID_KEY, client_id)])
        kind = {"logits": gpb.REPLY_LOGITS, "top_k": gpb.REPLY_TOP_K, "hidden": gpb.REPLY_HIDDEN}[reply]
        self._send(gpb.GenerationRequest(open=gpb.SessionOpen(adapter=ADAPTERS[adapter], reply=kind, top_k=top_k,
                                                              max_tokens=max_tokens, fingerprint=fingerprint)))
        self.opened = self._receive().opened
        self.session = self.opened.session

    def _send(self, request: gpb.GenerationRequest) -> int:
        sent = 0
        for piece in chunked([request], gpb.GenerationRequest, self._chunk):
            sent += piece.ByteSize()
            self._requests.put(piece)
        return sent

    def _receive(self) -> gpb.GenerationReply:
        parts = Reassembler(max_bytes=1 << 34)
        for reply in self._call:
            whole = parts.whole(reply, gpb.GenerationReply.FromString)
            if whole is not None:
                return whole
        raise ConnectionError("the server ended the generation stream")

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             reorder: torch.Tensor | None = None, codec: int = 1) -> Answer:
        """Send the activations of the new positions; return the server's answer for the last one."""
        step = gpb.GenerationStep(session=self.session, step=self._step, hidden=encode_tensor(hidden.detach(), codec),
                                  attention_mask=encode_tensor(attention_mask.to(torch.int64)),
                                  position_ids=encode_tensor(position_ids.to(torch.int64)))
        if reorder is not None:
            step.reorder.CopyFrom(encode_tensor(reorder.to(torch.int64)))
        sent = self._send(gpb.GenerationRequest(step=step))
        reply = self._receive()
        self._step += 1
        out = reply.step
        kind = out.WhichOneof("output")
        if kind == "top_k":
            values, ids = decode_tensor(out.top_k.log_probs), decode_tensor(out.top_k.token_ids)
            scores = torch.full((values.shape[0], self._vocab), float("-inf"))
            scores.scatter_(1, ids.long(), values.float())
        else:
            scores = decode_tensor(getattr(out, kind)).float()
        return Answer(scores, sent, reply.ByteSize())

    def close(self) -> None:
        """End the stream (the server frees the session)."""
        self._requests.put(None)
        self._call.cancel()
