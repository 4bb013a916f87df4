"""Time to target: CenLoRA, FedLoRA and SplitLoRA (3 clients) from the same base model and initial adapter, on
the same data and total samples; validation loss per round's worth of samples against samples, measured seconds
and modeled seconds (device profiles), bytes moved and client-side FLOPs."""
from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import assets, baselines, costs, report, ttt_split
from benchmarks.baselines import Curve
from benchmarks.config import BenchConfig, parse_shape
from benchmarks.evaluate import Evaluator, full_model, initial_adapter, perplexity
from benchmarks.profiles import load_profiles
from common.data import BatchStream, shard
from common.optim import OptimSettings


def _mean_width(encoded: list, batch: int, pad_id: int) -> int:
    stream = BatchStream(encoded, batch, pad_id, seed=0)
    return round(statistics.mean(stream.next_batch()["input_ids"].shape[1] for _ in range(50)))


def train_all(cfg: BenchConfig, model: Path) -> tuple[list[Curve], list, int]:
    """The three runs, SplitLoRA first (its client processes then have the machine to themselves)."""
    tokenizer = assets.tokenizer_of(model)
    train, held_out = assets.examples(cfg)
    encoded = assets.encoded(tokenizer, train, cfg.max_seq_len)
    pad = tokenizer.pad_token_id
    evaluator = Evaluator(model, cfg.lora(), assets.encoded(tokenizer, held_out, cfg.max_seq_len), pad)
    init = initial_adapter(model, cfg.split_layer, cfg.lora(), cfg.seed)
    n, r, s, b = cfg.clients, cfg.rounds, cfg.local_steps, cfg.batch_size
    work = cfg.out_dir / "work" / "time-to-target"
    split = ttt_split.splitlora(cfg, model, work / "split", init, evaluator.loss)
    whole = full_model(model, cfg.lora())
    cen = baselines.cenlora(whole, init, encoded, pad, b, n * r * s, n * s,
                            OptimSettings(cfg.learning_rate, 0.01, cfg.warmup_steps, n * r * s), 0.1, cfg.seed,
                            evaluator.loss)
    shards = [shard(encoded, i, n) for i in range(n)]
    fed = baselines.fedlora(whole, init, shards, pad, b, r, s,
                            OptimSettings(cfg.learning_rate, 0.01, cfg.warmup_steps, r * s), 0.1, cfg.seed,
                            evaluator.loss)
    return [cen, fed, split], encoded, pad


def run(cfg: BenchConfig) -> Path:
    """Train the three methods, model their time on every profile; write time-to-target.{json,md} and plots."""
    model = assets.model_dir(cfg)
    curves, encoded, pad = train_all(cfg, model)
    split = curves[2]
    seq = _mean_width(encoded, cfg.batch_size, pad)
    trained = costs.measure_cost(model, cfg.split_layer, cfg.lora(), cfg.seed, cfg.batch_size, seq,
                                 (split.extra["bytes_up_per_step"], split.extra["bytes_down_per_step"]))
    projected = [costs.measure_cost(assets.model_dir(cfg, parse_shape(s)), cfg.split_layer, cfg.lora(), cfg.seed,
                                    cfg.batch_size, seq) for s in cfg.project_shapes if not cfg.model]
    profiles = load_profiles(cfg.profiles)
    target = cfg.target_loss or max(min(c.val_loss) for c in curves)
    hit = {c.method: costs.first_reaching(c.val_loss, target) for c in curves}
    modeled = {cost.model: {p.name: costs.modeled_seconds(p, cost, cfg.clients, cfg.local_steps, cfg.rounds)
                            for p in profiles} for cost in [trained, *projected]}
    rows = []
    for c in curves:
        i = hit[c.method]
        row = {"method": c.method, "final_val_loss": c.val_loss[-1], "final_ppl": perplexity(c.val_loss[-1]),
               "samples_to_target": c.samples[i] if i is not None else "not reached",
               "measured_s_to_target": c.seconds[i] if i is not None else float("nan")}
        for cost_name, by_profile in modeled.items():
            for p in profiles:
                times = by_profile[p.name]
                row[f"modeled_s[{p.name}, {_short(cost_name)}]"] = times[c.method][i] if i is not None else float("nan")
        row["client_GFLOP_each"] = _client_flops(c.method, trained, cfg) / 1e9
        row["MB_moved"] = _bytes_moved(c.method, trained, cfg, split) / 1e6
        rows.append(row)
    ratios = _ratios(rows)
    plots = _plots(cfg, curves, modeled, trained, projected, profiles)
    notes = [f"model {model.name}: random init (no model hub here), GPT-2's real tokenizer; split after block "
             f"{cfg.split_layer}; LoRA r={cfg.lora_r} on {','.join(cfg.lora_targets)}; AdamW lr {cfg.learning_rate:g}",
             f"{cfg.clients} clients x {cfg.rounds} rounds x {cfg.local_steps} steps x batch {cfg.batch_size} = "
             f"{cfg.clients * cfg.rounds * cfg.local_steps * cfg.batch_size} samples for every method; validation "
             f"loss on {cfg.eval_examples} held-out examples after every round's worth of samples",
             f"target validation loss {target:.4f} ({'given' if cfg.target_loss else 'the best loss every method reaches'})",
             "measured_s: training time on this machine (CenLoRA in one process; FedLoRA clients in turn in one process;"
             " SplitLoRA real client processes and server sharing the same cores); evaluation time excluded",
             "modeled_s: see benchmarks/profiles.py for the formulas and benchmarks/profiles.yaml for the profiles; "
             f"per-step FLOPs counted at {cfg.batch_size} x {seq} tokens",
             *ratios]
    result = {"target_loss": target, "curves": [vars(c) for c in curves], "costs": [trained.as_dict()] +
              [p.as_dict() for p in projected], "profiles": [vars(p) for p in profiles], "modeled": modeled}
    return report.write(cfg.out_dir, "time-to-target", "Time to target: CenLoRA vs FedLoRA vs SplitLoRA", result,
                        rows, notes, plots)


def _short(model_name: str) -> str:
    return model_name.removeprefix("gpt2-random-").split("-")[0]


def _client_flops(method: str, cost: costs.Cost, cfg: BenchConfig) -> float:
    """FLOPs one client (the one device, for CenLoRA) computes over the whole run."""
    steps = cfg.rounds * cfg.local_steps
    return {"CenLoRA": cfg.clients * steps * cost.full_flops, "FedLoRA": steps * cost.full_flops,
            "SplitLoRA": steps * cost.client_flops}[method]


def _bytes_moved(method: str, cost: costs.Cost, cfg: BenchConfig, split: Curve) -> float:
    """Bytes over the network, all clients: activations/gradients and adapters, or the raw data (CenLoRA)."""
    exchanges = cfg.clients * cfg.rounds * 2
    if method == "SplitLoRA":
        steps = split.extra["steps"]
        return steps * (split.extra["bytes_up_per_step"] + split.extra["bytes_down_per_step"]) + \
            exchanges * cost.client_adapter_bytes
    if method == "FedLoRA":
        return exchanges * cost.full_adapter_bytes
    return Path(cfg.train_data).stat().st_size  # the raw training text, sent to the center once


def _ratios(rows: list[dict]) -> list[str]:
    """Time to target of each method over SplitLoRA's, per modeled column."""
    split = next(r for r in rows if r["method"] == "SplitLoRA")
    out = []
    for key in [k for k in split if k.startswith(("modeled_s", "measured_s"))]:
        parts = [f"{r['method']} {r[key] / split[key]:.2f}x" for r in rows
                 if r["method"] != "SplitLoRA" and split[key] and r[key] == r[key] and split[key] == split[key]]
        if parts:
            out.append(f"{key} relative to SplitLoRA: " + ", ".join(parts))
    return out


def _plots(cfg: BenchConfig, curves: list[Curve], modeled: dict, trained: costs.Cost, projected: list,
           profiles: list) -> list[Path]:
    out = cfg.out_dir
    made = [report.plot(out / "ttt-loss-vs-samples.png", {c.method: (c.samples, c.val_loss) for c in curves},
                        "training samples", "validation loss", "Validation loss vs samples"),
            report.plot(out / "ttt-loss-vs-measured-time.png", {c.method: (c.seconds, c.val_loss) for c in curves},
                        "measured training seconds (this machine)", "validation loss", "Validation loss vs measured time")]
    for cost in [trained, *projected][:2]:
        p = profiles[0]
        times = modeled[cost.model][p.name]
        made.append(report.plot(out / f"ttt-loss-vs-modeled-{_short(cost.model)}.png",
                                {c.method: (times[c.method], c.val_loss) for c in curves},
                                f"modeled seconds ({p.name}, {_short(cost.model)} cost)", "validation loss",
                                f"Validation loss vs modeled time ({p.name}, {_short(cost.model)})"))
    return [p for p in made if p]
