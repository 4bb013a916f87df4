"""Time to target: CenLoRA, FedLoRA and SplitLoRA (3 clients) from the same base model and initial adapter, on
the same data and total samples; validation loss per round's worth of samples against samples, measured seconds
and modeled seconds (device profiles), bytes moved and client-side FLOPs. `remodel` redoes the modeled part from
the JSON with other profiles, without training again."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from splitlora_bench import assets, baselines, costs, report, ttt_split
from splitlora_bench.baselines import Curve
from splitlora_bench.evaluate import Evaluator, full_model, initial_adapter, perplexity
from splitlora_bench.options import BenchConfig, parse_shape
from splitlora_bench.profiles import load_profiles
from common.data import BatchStream, shard
from common.optim import OptimSettings

NAME = "time-to-target"


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
    work = cfg.out_dir / "work" / NAME
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
    """Train the three methods and count their costs; then model and report (see `report_time`)."""
    model = assets.model_dir(cfg)
    curves, encoded, pad = train_all(cfg, model)
    split = curves[2]
    seq = _mean_width(encoded, cfg.batch_size, pad)
    trained = costs.measure_cost(model, cfg.split_layer, cfg.lora(), cfg.seed, cfg.batch_size, seq,
                                 (split.extra["bytes_up_per_step"], split.extra["bytes_down_per_step"]))
    projected = [costs.measure_cost(assets.model_dir(cfg, parse_shape(s)), cfg.split_layer, cfg.lora(), cfg.seed,
                                    cfg.batch_size, seq) for s in cfg.project_shapes if not cfg.model]
    measured = {"model": model.name, "train_data_bytes": assets.train_file(cfg).stat().st_size, "seq": seq,
                "curves": [vars(c) for c in curves], "costs": [c.as_dict() for c in [trained, *projected]]}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)  # kept even if the report fails: `remodel` redoes it
    (cfg.out_dir / f"{NAME}.json").write_text(json.dumps({"benchmark": NAME, "measured": measured}, default=float))
    return report_time(cfg, measured)


def remodel(cfg: BenchConfig) -> Path:
    """Model and report again from OUT/time-to-target.json with the profiles of --profiles."""
    path = cfg.out_dir / f"{NAME}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `splitlora-bench time-to-target --out {cfg.out}` first")
    return report_time(cfg, json.loads(path.read_text())["measured"])


def report_time(cfg: BenchConfig, measured: dict) -> Path:
    """Time to target per method: measured, and modeled on every profile for every cost basis."""
    curves = [Curve(**c) for c in measured["curves"]]
    trained, *projected = [costs.Cost(**c) for c in measured["costs"]]
    profiles = load_profiles(cfg.profiles)
    target = cfg.target_loss or max(min(c.val_loss) for c in curves)
    hit = {c.method: costs.first_reaching(c.val_loss, target) for c in curves}
    modeled = {cost.model: {p.name: costs.modeled_seconds(p, cost, cfg.clients, cfg.local_steps, cfg.rounds)
                            for p in profiles} for cost in [trained, *projected]}
    rows = [{"method": c.method, "final_val_loss": c.val_loss[-1], "final_ppl": perplexity(c.val_loss[-1]),
             "samples_to_target": c.samples[hit[c.method]] if hit[c.method] is not None else "not reached",
             "measured_s_to_target": c.seconds[hit[c.method]] if hit[c.method] is not None else float("nan"),
             "measured_s_total": c.seconds[-1],
             "client_GFLOP_each": _client_flops(c.method, trained, cfg) / 1e9,
             "MB_moved": _bytes_moved(c.method, trained, cfg, curves[2], measured["train_data_bytes"]) / 1e6}
            for c in curves]
    split_hit = hit["SplitLoRA"]
    model_rows = []
    for cost in [trained, *projected]:
        for p in profiles:
            times = modeled[cost.model][p.name]
            at = {m: times[m][hit.get(m, split_hit)] if hit.get(m, split_hit) is not None else float("nan")
                  for m in times}
            model_rows.append({"cost_of": _short(cost.model), "profile": p.name, **{f"{m}_s": v for m, v in at.items()},
                               "CenLoRA/SplitLoRA": _ratio(at["CenLoRA"], at["SplitLoRA"]),
                               "FedLoRA/SplitLoRA": _ratio(at["FedLoRA"], at["SplitLoRA"]),
                               "FedLoRA/SplitLoRA-int8": _ratio(at["FedLoRA"], at["SplitLoRA-int8"])})
    notes = [f"model {measured['model']}: GPT-2-shaped, built here (no model hub) with GPT-2's real tokenizer and "
             f"pretrained for {cfg.pretrain_steps} steps (splitlora_bench/pretrain.py); split after "
             f"block {cfg.split_layer}; LoRA r={cfg.lora_r} on {','.join(cfg.lora_targets)}; AdamW lr "
             f"{cfg.learning_rate:g}, batch {cfg.batch_size}",
             f"{cfg.clients} clients x {cfg.rounds} rounds x {cfg.local_steps} steps x batch {cfg.batch_size} = "
             f"{cfg.clients * cfg.rounds * cfg.local_steps * cfg.batch_size} samples for every method; validation "
             f"loss on {cfg.eval_examples} held-out examples after every round's worth of samples",
             f"target validation loss {target:.4f} "
             f"({'given' if cfg.target_loss else 'the best loss every method reaches'})",
             "measured_s: training time on this machine (CenLoRA in one process; FedLoRA clients in turn in one "
             "process; SplitLoRA real client processes and server sharing the same cores); evaluation time excluded",
             "modeled seconds: formulas in splitlora_bench/profiles.py, profiles in splitlora_bench/profiles.yaml; FLOPs per "
             f"step counted at {cfg.batch_size} x {measured['seq']} tokens; cost_of: the model whose FLOPs and bytes "
             "are used (the curves are the trained model's in every case); SplitLoRA-int8: the same run with int8 "
             "activations and gradients (the wire benchmark finds the loss unchanged)"]
    plots = _plots(cfg, curves, modeled, [trained, *projected], profiles)
    result = {"target_loss": target, "measured": measured, "profiles": [vars(p) for p in profiles],
              "modeled": modeled}
    return report.write(cfg.out_dir, NAME, "Time to target: CenLoRA vs FedLoRA vs SplitLoRA", result, rows, notes,
                        plots, tables=[("Modeled seconds to the target loss (and time ratios to SplitLoRA):",
                                        model_rows)])


def _ratio(a: float, b: float) -> float:
    """a / b, or NaN where b is zero (the target was met before training) or not reached."""
    return a / b if b and b == b else float("nan")


def _short(model_name: str) -> str:
    return model_name.removeprefix("gpt2-random-").split("-")[0]


def _client_flops(method: str, cost: costs.Cost, cfg: BenchConfig) -> float:
    """FLOPs one client (the one device, for CenLoRA) computes over the whole run."""
    steps = cfg.rounds * cfg.local_steps
    return {"CenLoRA": cfg.clients * steps * cost.full_flops, "FedLoRA": steps * cost.full_flops,
            "SplitLoRA": steps * cost.client_flops}[method]


def _bytes_moved(method: str, cost: costs.Cost, cfg: BenchConfig, split: Curve, data_bytes: int) -> float:
    """Bytes over the network, all clients: activations/gradients and adapters, or the raw data (CenLoRA)."""
    exchanges = cfg.clients * cfg.rounds * 2
    if method == "SplitLoRA":
        per_step = split.extra["bytes_up_per_step"] + split.extra["bytes_down_per_step"]
        return split.extra["steps"] * per_step + exchanges * cost.client_adapter_bytes
    if method == "FedLoRA":
        return exchanges * cost.full_adapter_bytes
    return data_bytes  # the raw training text, sent to the center once


def _plots(cfg: BenchConfig, curves: list[Curve], modeled: dict, bases: list[costs.Cost], profiles: list) -> list:
    out = cfg.out_dir
    made = [report.plot(out / "ttt-loss-vs-samples.png", {c.method: (c.samples, c.val_loss) for c in curves},
                        "training samples", "validation loss", "Validation loss vs samples"),
            report.plot(out / "ttt-loss-vs-measured-time.png", {c.method: (c.seconds, c.val_loss) for c in curves},
                        "measured training seconds (this machine)", "validation loss",
                        "Validation loss vs measured time")]
    for cost in bases:
        for p in profiles[:2]:
            times = modeled[cost.model][p.name]
            series = {m: (times[m], curves[2 if m.startswith("SplitLoRA") else i].val_loss)
                      for i, m in enumerate(times)}
            made.append(report.plot(out / f"ttt-modeled-{_short(cost.model)}-{p.name}.png", series,
                                    "modeled seconds", "validation loss",
                                    f"Loss vs modeled time: {_short(cost.model)} cost, {p.name}"))
    return [p for p in made if p]
