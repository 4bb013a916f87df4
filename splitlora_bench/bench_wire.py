"""Wire: bytes per step and final loss of each activation/gradient codec, and the CPU cost of each codec.

Each codec trains its own client against its own server from the same seed, data and schedule; the runs are
independent processes and run at the same time (their results do not depend on timing)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from splitlora_bench import assets, procs, report, split_run
from splitlora_bench.evaluate import Evaluator
from splitlora_bench.options import BenchConfig
from common.split.parts import load_config
from common.wire import codec_from_name, decode_tensor, encode_tensor


def start_run(cfg: BenchConfig, model: Path, codec: str, work: Path) -> list:
    """A server and one client training --wire-rounds x --wire-local-steps with `codec`, both started now."""
    procs.fresh(work)
    port = procs.free_port()
    server, _ = procs.start_server(split_run.server_flags(cfg, model, 1, cfg.wire_rounds, cfg.wire_local_steps,
                                                          codec, work / "server"), work / "server.log", cfg.threads,
                                   port=port)
    client = procs.start_client(split_run.client_flags(cfg, model, f"127.0.0.1:{port}", 0, 1, codec,
                                                       work / "client"), work / "client.log", cfg.threads)
    return [client, server]


def codec_ms(codec: str, shape: tuple[int, int, int], repeat: int = 20) -> float:
    """Median milliseconds to encode and decode one cut tensor of `shape` (what each side does once a step)."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    value = codec_from_name(codec)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        decode_tensor(encode_tensor(t, value))
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def run(cfg: BenchConfig) -> Path:
    """Train once per codec; write wire.{json,md,png}."""
    model = assets.model_dir(cfg)
    tokenizer = assets.tokenizer_of(model)
    work = {codec: cfg.out_dir / "work" / f"wire-{codec}" for codec in cfg.wire_codecs}
    running = {codec: start_run(cfg, model, codec, w) for codec, w in work.items()}
    _, held_out = assets.examples(cfg)
    evaluator = Evaluator(model, cfg.lora(), assets.encoded(tokenizer, held_out, cfg.max_seq_len),
                          tokenizer.pad_token_id)
    for codec, ps in running.items():
        procs.wait_all(ps, timeout=24 * 3600, logs=[work[codec] / "client.log", work[codec] / "server.log"])
    hidden = int(load_config(model).hidden_size)
    results = {}
    for codec, w in work.items():
        r = split_run.summarize([w / "client" / "metrics.jsonl"])
        r["val_loss"] = evaluator.loss(load_file(str(w / "server" / "adapter" / "adapter_model.safetensors")))
        r["bytes_per_step"] = r["bytes_up_per_step"] + r["bytes_down_per_step"]
        tail = r["losses"][0][-10:]
        r["last10_train_loss"] = sum(tail) / len(tail)
        r["codec_ms"] = codec_ms(codec, (cfg.batch_size, 64, hidden))
        results[codec] = r
    ref = results.get("float32")
    rows = [{"codec": codec, "KB_up_per_step": r["bytes_up_per_step"] / 1e3,
             "KB_down_per_step": r["bytes_down_per_step"] / 1e3,
             "bytes_vs_float32": ref["bytes_per_step"] / r["bytes_per_step"] if ref else float("nan"),
             "final_val_loss": r["val_loss"],
             "val_loss_diff_pct": 100 * (r["val_loss"] - ref["val_loss"]) / ref["val_loss"] if ref else float("nan"),
             "last10_train_loss": r["last10_train_loss"], "encode+decode_ms": r["codec_ms"]}
            for codec, r in results.items()]
    plots = [p for p in [report.plot(cfg.out_dir / "wire.png",
                                     {c: (list(range(1, len(r["losses"][0]) + 1)), r["losses"][0])
                                      for c, r in results.items()},
                                     "step", "training loss", "Training loss per codec")] if p]
    notes = [f"{model.name}; one client, {cfg.wire_rounds} rounds x {cfg.wire_local_steps} steps, batch "
             f"{cfg.batch_size}, same seed, data and schedule for every codec; the codec applies to activations (up) "
             "and gradients (down); mask, labels and positions travel as uint8/int32/int32",
             f"final_val_loss: the exported whole-model adapter on {cfg.eval_examples} held-out examples "
             "(mean cross-entropy of completion tokens, no label smoothing)",
             "bytes_vs_float32: float32 bytes per step divided by this codec's",
             f"encode+decode_ms: one ({cfg.batch_size}, 64, {hidden}) float32 tensor through the codec and back, "
             "median of 20, in this process"]
    return report.write(cfg.out_dir, "wire", "Wire codecs: bytes per step and final loss", {"results": results},
                        rows, notes, plots)
