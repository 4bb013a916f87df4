"""Inference sessions on a real server: cached decode == uncached prefill, decode steps of concurrent sessions
stacked in one forward, limits and expiry (each a gRPC status, memory freed), and one client cannot touch
another's session."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch
from transformers import DynamicCache

from splitlora_client.generation.remote import RemoteSession
from common.rpc.splitlora.v1 import split_pb2 as spb
from tests.support.families import VOCAB, checkpoint_dir
from tests.support.servers import fingerprint_for, join
from tests.support.split_reference import EXACT
from tests.support.generation import left_padded, open_session, sessions_freed, split_model, split_setup

LENGTHS = (6, 3)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _prefill(session: RemoteSession, client, ids, mask, cache=None):
    positions = _positions(mask)
    with torch.no_grad():
        hidden = client(ids, mask, positions, cache=cache)
    return session.step(hidden, mask, positions).scores


def _decode(session: RemoteSession, client, token, mask, cache):
    positions = _positions(mask)[:, -1:]
    with torch.no_grad():
        hidden = client(token, mask, positions, cache=cache)
    return session.step(hidden, mask, positions).scores


def _open(harness, client_id="gen-0", **kw) -> RemoteSession:
    return open_session(harness, client_id, **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_decode_equals_uncached_prefill_and_nothing_learns(family: str, tmp_path) -> None:
    ids, mask = left_padded(LENGTHS)
    new = torch.randint(1, VOCAB, (len(LENGTHS), 4), generator=torch.Generator().manual_seed(2))
    with split_setup(family, tmp_path) as (harness, client, _):
        engine = harness.running.engine
        before = {k: v.clone() for k, v in engine.adapter_of("x").items()}
        cached, cache = _open(harness), DynamicCache()
        _prefill(cached, client, ids, mask, cache)
        for t in range(new.shape[1]):
            whole_ids = torch.cat([ids, new[:, :t + 1]], 1)
            whole_mask = torch.cat([mask, torch.ones_like(new[:, :t + 1])], 1)
            step = _decode(cached, client, new[:, t:t + 1], whole_mask, cache)
            uncached = _open(harness)
            full = _prefill(uncached, client, whole_ids, whole_mask)
            uncached.close()
            torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
        cached.close()
        after = engine.adapter_of("x")
        assert all(torch.equal(before[k], after[k]) for k in before)  # generation changed no bit of the adapter
        assert sessions_freed(harness) == (0, 0)


def test_decode_steps_of_concurrent_sessions_run_stacked_with_the_same_results(tmp_path) -> None:
    with split_setup("gpt2", tmp_path) as (harness, client, _):
        prompts = [left_padded((5, 2), seed=1), left_padded((7,), seed=2), left_padded((3, 4, 6), seed=3)]
        sessions, caches, alone = [], [], []
        for ids, mask in prompts:  # different cache lengths and rows per session
            session, cache = _open(harness), DynamicCache()
            _prefill(session, client, ids, mask, cache)
            sessions.append(session)
            caches.append(cache)
        tokens = [torch.full((ids.shape[0], 1), 5) for ids, _ in prompts]
        masks = [torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], 1) for _, mask in prompts]
        for (ids, mask), token, whole in zip(prompts, tokens, masks):  # reference: each alone, uncached
            ref = _open(harness)
            alone.append(_prefill(ref, client, torch.cat([ids, token], 1), whole))
            ref.close()
        scheduler = harness.running.generation.scheduler
        stacked_before = sum(n for size, n in scheduler.batch_sizes.items() if size > 1)
        gate = threading.Event()
        harness.running.engine.call(gate.wait)  # hold the engine so that the three steps wait together
        results = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, _decode(sessions[i], client, tokens[i], masks[i], caches[i]))) for i in range(3)]
        for thread in threads:
            thread.start()
        while len(scheduler._pending) < 3:
            threading.Event().wait(0.01)
        gate.set()
        for thread in threads:
            thread.join(timeout=60)
        assert sum(n for size, n in scheduler.batch_sizes.items() if size > 1) == stacked_before + 1
        for got, want in zip(results, alone):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for session in sessions:
            session.close()
        assert sessions_freed(harness) == (0, 0)


def test_limits_expiry_and_other_clients_sessions_are_refused_and_freed(tmp_path) -> None:
    ids, mask = left_padded((6, 6))
    with split_setup("gpt2", tmp_path, generation_max_tokens=8, generation_idle_seconds=0.5) as (harness, client, _):
        long_ids, long_mask = left_padded((9,))
        with pytest.raises(grpc.RpcError) as err:  # a prompt longer than the session may hold
            _prefill(_open(harness), client, long_ids, long_mask)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        owner = _open(harness, "alice")
        _prefill(owner, client, ids, mask, DynamicCache())
        intruder = _open(harness, "mallory")
        step = torch.zeros(2, 1, client.hidden_size)
        intruder.session = owner.session  # mallory names alice's session on her own stream
        with pytest.raises(grpc.RpcError) as err:
            intruder.step(step, torch.ones(2, 7, dtype=torch.long), torch.full((2, 1), 6))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        threading.Event().wait(1.0)  # alice's session sits idle past --generation-idle-seconds
        with pytest.raises(grpc.RpcError) as err:
            _decode(owner, client, torch.ones(2, 1, dtype=torch.long), torch.ones(2, 7, dtype=torch.long),
                    DynamicCache())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert sessions_freed(harness) == (0, 0)
    with split_setup("gpt2", tmp_path / "b", generation_session_bytes=1000) as (harness, client, _):
        with pytest.raises(grpc.RpcError) as err:
            _prefill(_open(harness), client, ids, mask)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            _open(harness, adapter="own")  # shared mode: there is no per-client adapter to use
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        other = fingerprint_for(str(checkpoint_dir("llama")), 2, EXACT)
        for fingerprint, code in ((other, grpc.StatusCode.FAILED_PRECONDITION),
                                  (spb.Fingerprint(), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as err:  # another model, or none said
                RemoteSession(harness.channel, "gen-0", vocab_size=VOCAB, fingerprint=fingerprint)
            assert err.value.code() == code
        assert sessions_freed(harness) == (0, 0)


def test_server_memory_returns_to_baseline_after_many_sessions(tmp_path) -> None:
    ids, mask = left_padded((5, 4, 3))
    with split_setup("gpt2", tmp_path) as (harness, client, _):
        model = split_model(harness, client)
        for i in range(12):  # some run to the end, some are cancelled after the prefill
            if i % 2:
                model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, max_new_tokens=3, do_sample=False)
            else:
                session = _open(harness)
                _prefill(session, client, ids, mask)
                store = harness.running.generation.store
                assert store.totals() == (1, 3 * 5 * store.bytes_per_position)  # 3 rows x 5 positions, accounted
                session.close()
        assert sessions_freed(harness) == (0, 0)
        assert harness.status().generation_sessions == 0 and harness.status().generation_tokens > 0
        assert harness.running.generation.store.opened_total == 12
        metrics = {m.name: m.samples[0].value for m in harness.running.generation.collector().collect()}
        assert metrics["splitlora_generation_sessions"] == 0 and metrics["splitlora_generation_cache_bytes"] == 0
        assert metrics["splitlora_generation_sessions_opened"] == 12


def test_own_adapter_is_the_clients_per_client_copy_and_nobody_elses(tmp_path) -> None:
    ids, mask = left_padded((5, 3))
    with split_setup("gpt2", tmp_path, server_adapter_mode="per-client") as (harness, client, _):
        join(harness, "alice")
        engine = harness.running.engine

        def perturb_alices_copy() -> None:  # alice's copy now differs from the shared adapter
            for name, param in engine.part.peft.named_parameters():
                if f".{engine.slots['alice'].name}." in name and "lora_B" in name:
                    param.data.add_(0.5)

        engine.call(perturb_alices_copy).result()
        scores = {}
        for adapter in ("own", "shared", "none"):
            session = _open(harness, "alice", adapter=adapter)
            scores[adapter] = _prefill(session, client, ids, mask)
            session.close()
        assert not torch.allclose(scores["own"], scores["shared"]) and not torch.allclose(scores["none"],
                                                                                          scores["shared"])
        with pytest.raises(grpc.RpcError) as err:  # bob has no copy of his own, and cannot name alice's
            _open(harness, "bob", adapter="own")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_adapter_of_switches_mode_and_adapter_only_when_needed_and_always_right(builtin_model_dir) -> None:
    """Generation skips the walk over every module when the part is already in eval mode with the adapter active;
    after a training step (train mode, dropout on) and across adapters it still computes what a fresh eval-mode
    part with that adapter set computes."""
    from common.split.parts import LoraSettings, SplitPart
    from splitlora_server.generation.compute import adapter_of

    part = SplitPart(builtin_model_dir, "server", 3, LoraSettings(4, 8, 0.5, ("c_attn",)), lora_seed=0)
    part.peft.add_adapter("b", part.lora.peft_config(part.family))
    with torch.no_grad():
        for name, param in part.peft.named_parameters():
            if ".b." in name and "lora_B" in name:
                param.add_(0.5)
    gen = torch.Generator().manual_seed(0)
    hidden, mask = torch.randn(2, 5, part.hidden_size, generator=gen), torch.ones(2, 5, dtype=torch.long)
    positions = torch.arange(5).expand(2, -1)
    outputs = []
    for name in ("default", "b", "default", "b"):
        part.train()  # what a training step leaves behind
        with adapter_of(part, name):
            assert not any(m.training for m in part.modules())
            outputs.append(part(hidden, mask, positions))
        with adapter_of(part, name):  # again, now without any switch
            torch.testing.assert_close(part(hidden, mask, positions), outputs[-1], rtol=0, atol=0)
    part.peft.set_adapter("b")
    part.eval()
    with torch.no_grad():
        reference = part(hidden, mask, positions)
    torch.testing.assert_close(outputs[1], reference, rtol=0, atol=0)
    torch.testing.assert_close(outputs[3], reference, rtol=0, atol=0)
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[1])
