"""Round checkpoints: exact round trips of adapters, optimizers, schedules and data positions; atomic writes that
survive a kill in the middle; versioned formats and refusals; the engine's rollback of a client's partial round."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.data import BatchStream
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.split.parts import LoraSettings, SplitPart
from common.state.optimizer import load_optimizer_state, load_scheduler_state, optimizer_state, scheduler_state
from common.state.snapshots import MANIFEST, TENSORS, CheckpointDir, CheckpointFormatError, check_same_run
from splitlora_server.engine.core import SHARED, ServerEngine
from splitlora_server.engine.state import ServerCheckpoints
from tests.support.steps import random_step

OPTIM = OptimSettings(learning_rate=1e-2, warmup_steps=2, total_steps=20)


def _train(params: list[torch.nn.Parameter], opt, sched, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer_step(params, opt, sched, 1.0)


def test_optimizer_and_schedule_round_trip_exactly_through_disk(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt, sched = build_optimizer(params, OPTIM)
    _train(params, opt, sched, 3, seed=1)
    tensors, meta = optimizer_state(opt, "optim")
    saved = {**tensors, **{f"p{i}": p.detach().clone() for i, p in enumerate(params)}}
    CheckpointDir(tmp_path, "test").save(3, saved, {"optim": meta, "sched": scheduler_state(sched)})
    _train(params, opt, sched, 2, seed=2)
    expected = [p.detach().clone() for p in params]

    ckpt = CheckpointDir(tmp_path, "test").load(3)
    fresh = [torch.nn.Parameter(ckpt.tensors[f"p{i}"].clone()) for i in range(2)]
    opt2, sched2 = build_optimizer(fresh, OPTIM)
    load_optimizer_state(opt2, ckpt.tensors, ckpt.meta["optim"], "optim")
    load_scheduler_state(sched2, ckpt.meta["sched"])
    _train(fresh, opt2, sched2, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(fresh, expected))
    assert sched2.get_last_lr() == sched.get_last_lr()
    # the stored tensors are not aliased by the optimizer it was loaded into
    assert torch.equal(ckpt.tensors["optim.0.exp_avg"], tensors["optim.0.exp_avg"])


def test_batch_stream_resumes_at_the_same_batch() -> None:
    data = [([i, i + 1, i + 2], [i, i + 1, i + 2]) for i in range(10)]
    stream = BatchStream(data, 3, pad_id=0, seed=5)
    for _ in range(5):
        stream.next_batch()
    state = stream.state_dict()
    expected = [stream.next_batch()["input_ids"] for _ in range(4)]
    again = BatchStream(data, 3, pad_id=0, seed=5)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()["input_ids"]) for a in expected)


def test_keeps_the_newest_two_and_reads_the_latest(tmp_path: Path) -> None:
    ckpts = CheckpointDir(tmp_path, "test")
    for r in range(4):
        ckpts.save(r, {"x": torch.full((2,), float(r))}, {"r": r})
    assert ckpts.rounds() == [2, 3]
    latest = ckpts.latest()
    assert latest.round == 3 and latest.meta == {"r": 3} and torch.equal(latest.tensors["x"], torch.full((2,), 3.0))
    ckpts.save(3, {"x": torch.zeros(2)}, {"r": "again"})  # the same round written again after a rollback
    assert ckpts.load(3).meta == {"r": "again"}
    ckpts.prune(after=2)
    assert ckpts.rounds() == [2]


def test_a_kill_in_the_middle_of_a_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    CheckpointDir(tmp_path, "test").save(1, {"x": torch.ones(3)}, {"r": 1})
    script = ("import os, signal, torch\n"
              "from pathlib import Path\n"
              "from common.state.snapshots import CheckpointDir\n"
              f"CheckpointDir(Path({str(tmp_path)!r}), 'test').save(2, {{'x': torch.zeros(3)}}, {{'r': 2}},\n"
              "    fault=lambda: os.kill(os.getpid(), signal.SIGKILL))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-round-0002") for p in tmp_path.iterdir())  # the torn write is there...
    ckpts = CheckpointDir(tmp_path, "test")
    assert ckpts.rounds() == [1] and ckpts.latest().meta == {"r": 1}  # ...and ignored
    ckpts.save(2, {"x": torch.zeros(3)}, {"r": 2})
    assert ckpts.rounds() == [1, 2] and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_refuses_other_versions_corruption_and_other_runs(tmp_path: Path) -> None:
    ckpts = CheckpointDir(tmp_path, "test")
    path = ckpts.save(1, {"x": torch.ones(3)}, {"run": {"seed": 0}})
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CheckpointFormatError, match="version 99; this version reads"):
        ckpts.load(1)
    (path / MANIFEST).write_text(json.dumps(manifest))
    data = bytearray((path / TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        ckpts.load(1)
    with pytest.raises(CheckpointFormatError, match="seed: checkpoint 0, now 1"):
        check_same_run({"seed": 0}, {"seed": 1}, path)
    with pytest.raises(CheckpointFormatError, match="is a test checkpoint"):
        CheckpointDir(tmp_path, "server").load(1)


# -- the engine --------------------------------------------------------------------------------------------------
LORA = LoraSettings(r=2, alpha=4, dropout=0.0)


def _engine(model: Path, mode: str, on_boundary=None) -> ServerEngine:
    return ServerEngine(SplitPart(model, "server", 2, LORA), mode, OPTIM, on_boundary=on_boundary).start()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollback_and_resume_retrace_the_same_steps(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    saved = []
    engine = _engine(tiny_gpt2_dir, "per-client", on_boundary=saved.append)
    try:
        for c in ("a", "b"):
            engine.add_client(c).result()
        for step in (0, 1):
            for c in ("a", "b"):
                engine.submit_step(random_step(c, step)).result()
        engine.close_round(0, {"a": 2.0, "b": 2.0}, ["a", "b"]).result()
        boundary = {c: engine.adapter_of(c) for c in ("a", "b")}
        engine.submit_step(random_step("a", 2)).result()
        engine.submit_step(random_step("b", 2)).result()
        after_b = engine.adapter_of("b")
        assert engine.rollback("a", 1).result()  # a redoes round 1: its slot is back at the boundary...
        assert _equal(engine.adapter_of("a"), boundary["a"]) and _equal(engine.adapter_of("b"), after_b)  # ...b's not
        assert not engine.rollback("a", 0).result()  # not the open round: nothing to undo
        engine.submit_step(random_step("a", 2)).result()
        redone = engine.adapter_of("a")
    finally:
        engine.stop()
    (state,) = saved
    assert state.round == 1 and set(state.slots) == {SHARED, "a", "b"}
    ServerCheckpoints(tmp_path, {"seed": 0}).save(state)

    restored = _engine(tiny_gpt2_dir, "per-client")  # a new process resuming from the checkpoint
    try:
        restored.restore(ServerCheckpoints(tmp_path, {"seed": 0}).latest()).result()
        assert _equal(restored.adapter_of("a"), boundary["a"])
        restored.submit_step(random_step("a", 2)).result()
        assert _equal(restored.adapter_of("a"), redone)  # the optimizer state came back too
    finally:
        restored.stop()


def test_shared_mode_rolls_back_only_while_nobody_else_stepped(tiny_gpt2_dir: Path) -> None:
    engine = _engine(tiny_gpt2_dir, "shared")
    try:
        start = engine.server_adapter()
        engine.submit_step(random_step("a", 0)).result()
        assert engine.rollback("a", 0).result() and _equal(engine.server_adapter(), start)
        engine.submit_step(random_step("a", 0)).result()
        engine.submit_step(random_step("b", 0)).result()
        assert not engine.rollback("a", 0).result()  # b's step is in the shared adapter too: keep both
    finally:
        engine.stop()
