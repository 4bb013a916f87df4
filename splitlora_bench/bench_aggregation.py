"""Aggregation: FedAvg, ffa and fedex under IID and non-IID (Dirichlet) partitions, 3 and 8 clients.

Split federated training is simulated in one process with exactly the split's maths (tests show split ==
unsplit): one whole model with LoRA, each client's client-side adapter (blocks [0, K)) and optimizer, one
shared server-side adapter and optimizer stepped by every client's steps in turn (the server's shared mode),
and every round end the client adapters combined by the named strategy of `common.aggregation` (fedex's
residuals folded into the frozen weights, as a client does). Per round: validation loss, and the relative
error of the global B·A (+ residual) against the sample-weighted mean of the clients' B_i·A_i."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from splitlora_bench import assets, report
from splitlora_bench.baselines import Curve
from splitlora_bench.evaluate import Evaluator, full_model, initial_adapter
from splitlora_bench.options import BenchConfig
from common.aggregation import ClientUpdate, build_strategy
from common.data import BatchStream, Encoded
from common.lora import AdapterState, adapter_state, load_adapter_state
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.partition import partition
from common.residuals import RESIDUAL, ResidualFolder, effective_products, split_residuals
from common.seeding import seed_torch
from common.split.parts import SplitPart

NAME = "aggregation"
log = logging.getLogger(__name__)


def product_error(glob: AdapterState, states: list[AdapterState], weights: list[float],
                  previous: AdapterState | None = None) -> float:
    """||global B·A + R - R_before - sum_i w_i B_i·A_i|| / ||sum_i w_i B_i·A_i||, all modules together (R_before:
    the residual already folded into the weights the clients trained on, from `previous`)."""
    total = sum(weights)
    products = [effective_products(s) for s in states]
    got = effective_products(glob)
    before = split_residuals(previous or {})[1]
    diff = norm = 0.0
    for key, value in got.items():
        if key + RESIDUAL in before:
            value = value - before[key + RESIDUAL].double()
        exact = sum(w / total * p[key] for w, p in zip(weights, products))
        diff += float((value - exact).pow(2).sum())
        norm += float(exact.pow(2).sum())
    return (diff / norm) ** 0.5 if norm > 0 else 0.0


class SplitFedSimulation:
    """One run: clients' client-side adapters and optimizers, the shared server-side adapter, one strategy."""

    def __init__(self, cfg: BenchConfig, model: Path, client_keys: set[str], init: AdapterState, strategy: str,
                 shards: list[list[Encoded]], pad_id: int) -> None:
        self.cfg, self.strategy = cfg, build_strategy(strategy)
        self.model = full_model(model, cfg.lora())
        load_adapter_state(self.model, init)
        self.folder = ResidualFolder(self.model)
        named = {n.replace(".default", ""): p for n, p in self.model.named_parameters() if "lora_" in n}
        self.client_keys = client_keys
        frozen = {k for k in client_keys if self.strategy.freezes_lora_a and "lora_A" in k}
        for key in frozen:
            named[key].requires_grad_(False)
        steps = cfg.rounds * cfg.local_steps
        client_optim = OptimSettings(cfg.learning_rate, 0.01, cfg.warmup_steps, steps)
        server_optim = OptimSettings(cfg.learning_rate, 0.01, cfg.warmup_steps, steps * len(shards))
        self.client_params = [named[k] for k in sorted(client_keys - frozen)]
        self.server_params = [p for k, p in sorted(named.items()) if k not in client_keys]
        self.clients = [build_optimizer(self.client_params, client_optim) for _ in shards]
        self.max_grad_norm = client_optim.max_grad_norm
        self.server = build_optimizer(self.server_params, server_optim)
        self.streams = [BatchStream(s, cfg.batch_size, pad_id, seed=cfg.seed + i) for i, s in enumerate(shards)]
        self.states = [{k: init[k].clone() for k in client_keys} for _ in shards]
        self.previous: AdapterState | None = None
        self.steps = 0

    def step(self, i: int) -> None:
        """One step of client i: its client adapter and the shared server adapter, both updated."""
        load_adapter_state(self.model, {**self.server_state(), **self.states[i]})
        self.model.train()
        seed_torch(self.cfg.seed, f"agg-{i}", self.steps)
        batch = self.streams[i].next_batch()
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits
        loss, _ = causal_lm_loss(logits, batch["labels"], 0.1)
        loss.backward()
        optimizer_step(self.client_params, *self.clients[i], self.max_grad_norm)
        optimizer_step(self.server_params, *self.server, self.max_grad_norm)
        self.states[i] = {k: v for k, v in adapter_state(self.model).items() if k in self.client_keys}
        self.steps += 1

    def server_state(self) -> AdapterState:
        return {k: v for k, v in adapter_state(self.model).items() if k not in self.client_keys}

    def round_end(self, rnd: int) -> tuple[AdapterState, float]:
        """Combine the client adapters; every client continues from the result. Returns (global, B·A error)."""
        weights = [float(self.cfg.local_steps * self.cfg.batch_size)] * len(self.states)
        glob = self.strategy.aggregate(rnd, [ClientUpdate(str(i), s, w) for i, (s, w) in
                                             enumerate(zip(self.states, weights))], self.previous)
        error = product_error(glob, self.states, weights, self.previous)
        adapter, residuals = split_residuals(glob)
        self.states = [dict(adapter) for _ in self.states]
        self.folder.fold(residuals)
        self.previous = glob
        return glob, error


def simulate(cfg: BenchConfig, model: Path, strategy: str, shards: list[list[Encoded]], pad_id: int,
             evaluator: Evaluator, eval_folder: ResidualFolder) -> Curve:
    """Train `cfg.rounds` rounds; validation loss and the aggregation error after every round."""
    init = initial_adapter(model, cfg.split_layer, cfg.lora(), cfg.seed)
    client_keys = set(adapter_state(SplitPart(model, "client", cfg.split_layer, cfg.lora(), lora_seed=cfg.seed).peft))
    sim = SplitFedSimulation(cfg, model, client_keys, init, strategy, shards, pad_id)
    curve, spent = Curve(strategy), 0.0
    eval_folder.reset()  # the evaluator's model back to the unmodified base
    curve.add(0, evaluator.loss(init), 0.0)
    curve.extra["aggregation_error"] = [0.0]
    for rnd in range(cfg.rounds):
        started = time.perf_counter()
        for _ in range(cfg.local_steps):
            for i in range(len(shards)):
                sim.step(i)
        glob, error = sim.round_end(rnd)
        spent += time.perf_counter() - started
        adapter, residuals = split_residuals(glob)
        eval_folder.fold(residuals)
        curve.add((rnd + 1) * len(shards) * cfg.local_steps * cfg.batch_size,
                  evaluator.loss({**sim.server_state(), **adapter}), spent)
        curve.extra["aggregation_error"].append(error)
        log.info("aggregation %s, %d clients: round %d/%d, validation loss %.4f, B·A error %.2e", strategy,
                 len(shards), rnd + 1, cfg.rounds, curve.val_loss[-1], error)
    return curve


def run(cfg: BenchConfig) -> Path:
    """Every strategy x partition x client count; report loss per round, FedAvg's error and time to target."""
    model = assets.model_dir(cfg)
    tokenizer = assets.tokenizer_of(model)
    train, held_out = assets.examples(cfg)
    pad = tokenizer.pad_token_id
    evaluator = Evaluator(model, cfg.lora(), assets.encoded(tokenizer, held_out, cfg.max_seq_len), pad)
    eval_folder = ResidualFolder(evaluator.model)
    runs = []
    for clients in cfg.aggregation_clients:
        for scheme in cfg.partitions:
            parts = partition(train, clients, scheme, cfg.dirichlet_alpha, cfg.seed, min_size=cfg.batch_size)
            shards = [assets.encoded(tokenizer, p, cfg.max_seq_len) for p in parts]
            for strategy in cfg.aggregation_strategies:
                curve = simulate(cfg, model, strategy, shards, pad, evaluator, eval_folder)
                runs.append({"clients": clients, "partition": scheme, "shard_sizes": [len(p) for p in parts],
                             **vars(curve)})
    return _report(cfg, runs)


def _report(cfg: BenchConfig, runs: list[dict]) -> Path:
    target = cfg.target_loss or max(min(r["val_loss"]) for r in runs)
    rows = []
    for r in runs:
        hit = next((i for i, v in enumerate(r["val_loss"]) if v <= target), None)
        errors = r["extra"]["aggregation_error"][1:]
        rows.append({"clients": r["clients"], "partition": r["partition"], "strategy": r["method"],
                     "val_loss_per_round": " ".join(f"{v:.3f}" for v in r["val_loss"]),
                     "final_val_loss": r["val_loss"][-1],
                     "B·A_error_per_round": " ".join(f"{e:.1e}" for e in errors),
                     "rounds_to_target": hit if hit is not None else "not reached",
                     "s_to_target": r["seconds"][hit] if hit is not None else float("nan")})
    alpha = cfg.dirichlet_alpha
    notes = [f"{cfg.rounds} rounds x {cfg.local_steps} steps x batch {cfg.batch_size} per client; split after block "
             f"{cfg.split_layer}; LoRA r={cfg.lora_r} on {','.join(cfg.lora_targets)}; AdamW lr {cfg.learning_rate:g}; "
             "one shared server adapter; clients weighted by samples (equal here: same steps per round)",
             f"partitions: iid = every n-th line; dirichlet = Dirichlet(alpha={alpha:g}) over the (eatType, food, "
             "area) combinations of the meaning representation (common/partition.py); shard sizes in the JSON",
             "B·A error: ||global B·A (+ folded residual) - mean_i B_i·A_i|| / ||mean_i B_i·A_i|| over the client "
             "modules after each round (0 up to float rounding for exact strategies)",
             f"target validation loss {target:.4f} ({'given' if cfg.target_loss else 'the worst run best loss'}); "
             "s_to_target: training seconds on this machine, evaluation excluded"]
    plots = [report.plot(cfg.out_dir / f"aggregation-{c}-{p}.png",
                         {r["method"]: (list(range(len(r["val_loss"]))), r["val_loss"])
                          for r in runs if r["clients"] == c and r["partition"] == p},
                         "round", "validation loss", f"{c} clients, {p}")
             for c in cfg.aggregation_clients for p in cfg.partitions]
    return report.write(cfg.out_dir, NAME, "Aggregation: FedAvg vs ffa vs fedex, IID and non-IID",
                        {"target_loss": target, "runs": runs}, rows, notes, [p for p in plots if p])
