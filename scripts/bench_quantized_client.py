"""Peak RSS of a real `splitlora-client train` process with `--client-quantization none|int8|int4` against a
full-model LoRA fine-tune of the same checkpoint, and the validation loss each client reaches (issue 17).

The checkpoint is a random-init 16-block Llama-style model (hidden 1024, MLP 2816, 16 heads, 4 key/value heads,
untied 50,257-word embeddings and head: GPT-2's tokenizer, the only real one here), written to --work. For each
quantization a `splitlora-server serve` and a `splitlora-client train` run as the console scripts a user runs
(loopback, plaintext, one client, the same seed, data and steps; a mode `int8+gc` adds the client's
--gradient-checkpointing); the client's peak RSS is its `ru_maxrss` from
`os.wait4`, and its validation losses come from its metrics.jsonl (`--eval-data`). The full-model fine-tune is a
fresh interpreter: the whole model with peft LoRA (the same rank, targets and learning rate), AdamW, the same
batch size, sequence cap and number of steps. This parent never imports torch (Linux carries a parent's peak RSS
into a forked child).

    .venv/bin/python scripts/bench_quantized_client.py --data TRAIN.txt --eval-data HELD_OUT.txt \
        --tokenizer ../shared/data/gpt2-tokenizer [--rounds 2 --local-steps 4 --eval-examples 64 --port 59100]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LLAMA_16 = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


def write_checkpoint(model_dir: Path, tokenizer_dir: str) -> None:
    """The random Llama-style checkpoint and its tokenizer, saved as a user's model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **LLAMA_16)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)


def full_finetune(model_dir: Path, args: argparse.Namespace) -> dict:
    """The whole model with peft LoRA trained for the same steps on the same kind of batches."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from common.data import BatchStream, encode, load_examples
    from common.loss import causal_lm_loss
    from common.split import family_for
    from common.split.parts import LoraSettings
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraSettings().peft_config(family_for(base.config.model_type))).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    stream = BatchStream([encode(tokenizer, ex, args.max_seq_len) for ex in load_examples(args.data)],
                         args.batch_size, tokenizer.pad_token_id, seed=0)
    losses = []
    for _ in range(args.rounds * args.local_steps):
        b = stream.next_batch()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
        loss, _ = causal_lm_loss(logits, b["labels"], 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"losses": losses}


def run_waited(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, int, float]:
    """Run `cmd` to its end; (exit code, peak RSS in bytes, wall seconds) as the kernel saw it."""
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.monotonic() - started


def split_run(mode: str, model_dir: Path, work: Path, port: int, args: argparse.Namespace,
              env: dict[str, str]) -> dict:
    """Server + client for one quantization; the client's peak RSS, exit code and validation losses."""
    out = work / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--model", str(model_dir), "--split-layer", str(args.split_layer), "--insecure"]
    server = subprocess.Popen(
        [str(BIN / "splitlora-server"), "serve", *common, "--port", str(port), "--clients", "1", "--rounds",
         str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
         "--learning-rate", str(args.learning_rate), "--warmup-steps", "0", "--max-seq-len", str(args.max_seq_len),
         "--seed", "0", "--output", str(out / "server"), "--finish-grace-seconds", "600",
         "--first-message-seconds", "600"],  # a slow client's first forward comes after the stream opens
        stdout=(out / "server.out").open("w"), stderr=(out / "server.log").open("w"), env=env, cwd=ROOT)
    code = -1
    try:
        code, peak, wall = run_waited(
            [str(BIN / "splitlora-client"), "train", *common, "--server", f"127.0.0.1:{port}", "--client-id",
             "edge", "--data", str(args.data), "--eval-data", str(work / "held_out.txt"), "--seed", "0",
             "--output", str(out / "client"), "--client-quantization", mode.partition("+")[0], "--join-timeout",
             "600", "--no-progress", *(["--gradient-checkpointing"] if mode.endswith("+gc") else [])],
            out / "client.log", env)
    finally:
        try:
            server.wait(timeout=300 if code == 0 else 0.1)  # after a finished run it exits by itself
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    metrics = out / "client" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return {"exit_code": code, "peak_rss": peak, "wall_s": wall,
            "validation": [r["loss"] for r in records if r.get("event") == "validation"],
            "train_losses": [r["loss"] for r in records if r.get("event") == "step"],
            "log_tail": (out / "client.log").read_text().strip().splitlines()[-3:]}


def child_run(kind: str, model_dir: Path, work: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """`--child KIND` of this script in a fresh interpreter; its report plus its peak RSS."""
    cmd = [sys.executable, __file__, "--child", kind, "--model-dir", str(model_dir), "--data", str(args.data),
           "--eval-data", str(args.eval_data), "--tokenizer", args.tokenizer, "--rounds", str(args.rounds),
           "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--max-seq-len",
           str(args.max_seq_len), "--learning-rate", str(args.learning_rate)]
    code, peak, wall = run_waited(cmd, work / f"{kind}.log", env)
    if code:
        raise SystemExit(f"{kind} failed with exit code {code}; see {work / f'{kind}.log'}")
    lines = (work / f"{kind}.log").read_text().strip().splitlines()
    return {**(json.loads(lines[-1]) if lines else {}), "peak_rss": peak, "wall_s": wall}


def report(results: dict[str, dict]) -> str:
    """The table: peak RSS, ratio to the full fine-tune, validation losses and their change against none."""
    full, base = results["full"]["peak_rss"], results["baseline"]["peak_rss"]
    ref = results.get("none", {}).get("validation", [])  # a run without --modes none has no reference
    lines = ["| process | exit | peak RSS (MiB) | / full | over baseline / full over baseline | validation loss "
             "per round | last vs none |", "|---|---|---:|---:|---:|---|---:|"]
    for name, r in results.items():
        val, change = r.get("validation", []), ""
        if val and ref and name != "none":
            change = f"{(val[-1] - ref[-1]) / ref[-1] * 100:+.3f} %"
        lines.append(f"| {name} | {r.get('exit_code', 0)} | {r['peak_rss'] / MiB:.1f} | {r['peak_rss'] / full:.3f} "
                     f"| {(r['peak_rss'] - base) / (full - base):.3f} | {' '.join(f'{v:.4f}' for v in val)} "
                     f"| {change} |")
    refused = [f"{n}: {r['log_tail'][-1]}" for n, r in results.items() if r.get("exit_code")]
    return "\n".join(lines + [f"refused: {line}" for line in refused])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="training lines (E2E context||completion)")
    parser.add_argument("--eval-data", type=Path, required=True, help="held-out lines (the first --eval-examples)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (GPT-2's)")
    parser.add_argument("--work", type=Path, default=Path("runs/quantized-client"))
    parser.add_argument("--modes", default="none,int8,int4",
                        help="client quantizations to run; MODE+gc: with the client's --gradient-checkpointing")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--split-layer", type=int, default=4, help="client blocks (L/4 of 16, as Llama's branch)")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--port", type=int, default=59100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["write", "baseline", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "write":
        write_checkpoint(args.model_dir, args.tokenizer)
    elif args.child == "baseline":
        import peft, torch, transformers  # noqa: F401,E401  (what every measured process imports)
        print(json.dumps({}))
    elif args.child == "full":
        print(json.dumps(full_finetune(args.model_dir, args)))
    else:
        main_parent(args)


def main_parent(args: argparse.Namespace) -> None:
    """Write the checkpoint once, run each measurement, print the table and write results.json."""
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    model_dir = work / "llama-16x1024-random"
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--child", "write", "--model-dir", str(model_dir), "--data",
                        str(args.data), "--eval-data", str(args.eval_data), "--tokenizer", args.tokenizer],
                       check=True, env=env, cwd=ROOT)
    held = [line for line in args.eval_data.read_text().splitlines() if line.strip()][:args.eval_examples]
    (work / "held_out.txt").write_text("\n".join(held) + "\n")
    results = {"baseline": child_run("baseline", model_dir, work, args, env)}
    for i, mode in enumerate(args.modes.split(",")):
        results[mode] = split_run(mode, model_dir, work, args.port + i, args, env)
        print(mode, json.dumps({k: v for k, v in results[mode].items() if k != "train_losses"}), flush=True)
    results["full"] = child_run("full", model_dir, work, args, env)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
