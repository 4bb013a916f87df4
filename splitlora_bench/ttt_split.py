"""The SplitLoRA run of `time-to-target`: a real server (in this process, so the shared server adapter can be
read at every round end) and real client processes, each on an IID shard of the training data."""
from __future__ import annotations

from pathlib import Path

from splitlora_bench import procs, split_run
from splitlora_bench.baselines import Curve, Evaluate
from splitlora_bench.options import BenchConfig
from common.lora import AdapterState, adapter_state
from splitlora_server.app import start_server
from splitlora_server.engine.core import SHARED, ServerEngine
from splitlora_server.options import ServeConfig
from splitlora_server.rounds.coordinator import RoundListener


def serve_config(cfg: BenchConfig, model: Path, out: Path) -> ServeConfig:
    """The server of the run, with the same settings `split_run.server_flags` gives a server process."""
    s = ServeConfig(model=str(model), host="127.0.0.1", port=0, clients=cfg.clients, rounds=cfg.rounds,
                    local_steps=cfg.local_steps, batch_size=cfg.batch_size, split_layer=cfg.split_layer,
                    learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, max_seq_len=cfg.max_seq_len,
                    seed=cfg.seed, codecs=["float32"], output=str(out), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout, lora_targets=list(cfg.lora_targets), insecure=True)
    s.validate()
    return s


class RoundEndSnapshots(RoundListener):
    """Copies of the shared server adapter at every round end (round number -> future of the copy).

    Subscribed after the engine's round end: while a round closes, no step of the next round can be queued (the
    coordinator holds the round), so the copy, queued right behind the engine's round end, is exactly the adapter
    at the round's end."""

    def __init__(self, engine: ServerEngine) -> None:
        self.engine, self.snapshots = engine, {}

    def round_closing(self, rnd: int, included: list[str]) -> None:
        self.snapshots[rnd] = self.engine.call(lambda: adapter_state(self.engine.part.peft, SHARED))


def splitlora(cfg: BenchConfig, model: Path, work: Path, init: AdapterState, evaluate: Evaluate) -> Curve:
    """Train with --clients client processes; evaluate the whole-model adapter after every round."""
    procs.fresh(work)
    running = start_server(serve_config(cfg, model, work / "server"))
    round_ends = RoundEndSnapshots(running.engine)
    running.rounds.subscribe(round_ends)
    address = f"127.0.0.1:{running.port}"
    logs = [work / f"client-{i}.log" for i in range(cfg.clients)]
    clients = [procs.start_client(split_run.client_flags(cfg, model, address, i, cfg.clients, "float32",
                                                         work / f"client-{i}"), logs[i], cfg.threads)
               for i in range(cfg.clients)]
    try:
        procs.wait_all(clients, timeout=24 * 3600, logs=logs)
        if not running.wait_finished():
            raise RuntimeError("the split server did not finish its rounds")
        globals_ = [running.aggregator.global_adapter(r) for r in range(cfg.rounds)]
        server_states = [round_ends.snapshots[r].result() for r in range(cfg.rounds)]
    finally:
        procs.stop(clients)
        running.stop(grace=0)
    summary = split_run.summarize([work / f"client-{i}" / "metrics.jsonl" for i in range(cfg.clients)])
    curve = Curve("SplitLoRA", extra=summary)
    curve.add(0, evaluate(init), 0.0)
    per_round = cfg.clients * cfg.local_steps * cfg.batch_size
    for r, (client_state, server_state) in enumerate(zip(globals_, server_states)):
        curve.add((r + 1) * per_round, evaluate({**client_state, **server_state}), summary["round_end_s"][r])
    return curve
