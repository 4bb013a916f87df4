"""Helpers for split-generation tests: a server with given LoRA values, a client model over loopback, prompts."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import PeftModel

from common.split.parts import SplitPart
from splitlora_client.generation.model import SplitCausalLM
from splitlora_client.generation.remote import RemoteSession
from tests.support.families import VOCAB, checkpoint_dir, copy_adapter, reference
from tests.support.servers import Harness, running_server, server_fingerprint
from tests.support.split_reference import EXACT

SPLIT = 2
LORA_FLAGS = {"lora_dropout": 0.0, "split_layer": SPLIT}


@contextmanager
def split_setup(family: str, output: Path, **overrides: object) -> Iterator[tuple[Harness, SplitPart, PeftModel]]:
    """A running server of `family`'s tiny model whose shared adapter holds the reference's (non-zero) LoRA values,
    the client part with the same values, and the unsplit reference."""
    model_dir = checkpoint_dir(family)
    ref = reference(model_dir, EXACT)
    with running_server(model_dir, output, **{**LORA_FLAGS, **overrides}) as harness:
        harness.running.engine.call(lambda: copy_adapter(ref, harness.running.part)).result()
        client = SplitPart(model_dir, "client", SPLIT, EXACT).eval()
        copy_adapter(ref, client)
        yield harness, client, ref


def split_model(harness: Harness, client: SplitPart, client_id: str = "gen-0", **session: object) -> SplitCausalLM:
    """The split causal LM of `client` talking to `harness`'s server."""
    return SplitCausalLM(client, lambda: open_session(harness, client_id, **session))


def open_session(harness: Harness, client_id: str = "gen-0", **session: object) -> RemoteSession:
    """A session on `harness`'s server with the server's own model fingerprint (unless given)."""
    session.setdefault("fingerprint", server_fingerprint(harness))
    return RemoteSession(harness.channel, client_id, vocab_size=VOCAB, **session)


def left_padded(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of different lengths, left-padded (pad id 0) with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def sessions_freed(harness: Harness, within: float = 20.0) -> tuple[int, int]:
    """The server's (open sessions, cache bytes) once both are 0, or as they are after `within` seconds: a
    cancelled stream is noticed by the server a moment after the client ends it."""
    store = harness.running.generation.store
    deadline = time.monotonic() + within
    while store.totals() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    return store.totals()
