"""Peak memory of a SplitLoRA client (its share of the model) against a full-model LoRA fine-tune.

Writes a random GPT-2-small-shaped checkpoint (12 blocks, 768 wide, 50257 tokens) to a temp dir, then runs
each measurement in its own subprocess and reads that child's peak RSS (`ru_maxrss` from `os.wait4`):

  baseline  python + torch + transformers + peft imported, nothing built
  client    SplitPart(side="client", split_layer=3) + a few steps: forward, backward from a random gradient
            at the cut, AdamW step on the LoRA weights
  full      the whole model with peft LoRA, same batch, same steps, next-token loss

    .venv/bin/python scripts/bench_memory.py [--batch 8] [--seq 128] [--steps 3] [--split-layer 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)


def write_checkpoint(path: Path) -> None:
    """A random GPT-2-small-shaped model saved as a single safetensors file."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**GPT2_SMALL)).save_pretrained(path, safe_serialization=True)


class SavedActivations:
    """Bytes autograd keeps for the backward pass (tensors saved by ops), excluding the weights themselves."""

    def __init__(self, params) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _param_bytes(module) -> tuple[int, int]:
    """(frozen base bytes, trainable LoRA bytes) of a module."""
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    return frozen, sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def _batch(args: argparse.Namespace, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _train(step, params, steps: int, saved: SavedActivations) -> list[float]:
    """Run `steps` AdamW steps of `step()` (which does forward + backward); count saved tensors on the first."""
    import torch

    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []
    for i in range(steps):
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                losses.append(step())
        else:
            losses.append(step())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def child(mode: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """The measured work of one subprocess; returns what it knows about its own memory."""
    import torch
    import transformers  # noqa: F401  (the baseline pays for the same imports)
    from peft import get_peft_model

    from common.split.parts import LoraSettings, SplitPart

    if mode == "baseline":
        return {}
    lora = LoraSettings()
    if mode == "client":
        part = SplitPart(model_dir, "client", args.split_layer, lora).train()
        ids, mask, pos = _batch(args, part.vocab_size)

        def step() -> float:
            hidden = part(ids, mask, pos)
            hidden.backward(torch.randn_like(hidden))  # stands in for the gradient the server returns
            return 0.0

        module, params = part, [p for p in part.parameters() if p.requires_grad]
        cut_bytes = args.batch * args.seq * part.hidden_size * 4
    else:
        from transformers import AutoModelForCausalLM

        from common.split import family_for

        base = AutoModelForCausalLM.from_pretrained(model_dir)
        module = get_peft_model(base, lora.peft_config(family_for(base.config.model_type))).train()
        ids, mask, pos = _batch(args, base.config.vocab_size)

        def step() -> float:
            loss = module(input_ids=ids, attention_mask=mask, position_ids=pos, labels=ids).loss
            loss.backward()
            return float(loss.detach())

        params, cut_bytes = [p for p in module.parameters() if p.requires_grad], 0
    saved = SavedActivations(module.parameters())
    losses = _train(step, params, args.steps, saved)
    frozen, trainable = _param_bytes(module)
    return {"frozen_bytes": frozen, "lora_bytes": trainable, "saved_bytes": saved.nbytes, "cut_bytes": cut_bytes,
            "losses": losses}


def measure(mode: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """Run one mode in a fresh interpreter; its own report plus its peak RSS as the kernel saw it."""
    cmd = [sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--split-layer", str(args.split_layer)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{mode} child failed with exit code {proc.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": usage.ru_maxrss * 1024}


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    """The table, the ratio, and the client's peak accounted for."""
    mib = lambda b: f"{b / MiB:8.1f}"  # noqa: E731
    base_rss = results["baseline"]["peak_rss"]
    lines = [f"GPT-2 small shape (12 x 768, vocab 50257), float32, LoRA r=4 on c_attn, batch {args.batch} x seq "
             f"{args.seq}, {args.steps} AdamW steps, split layer {args.split_layer}", "",
             f"| process | peak RSS (MiB) | over baseline (MiB) | base weights (MiB) | saved activations (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for mode in ("baseline", "client", "full"):
        r = results[mode]
        extra = [mib(r["frozen_bytes"]), mib(r["saved_bytes"])] if mode != "baseline" else ["-", "-"]
        lines.append(f"| {mode} | {mib(r['peak_rss'])} | {mib(r['peak_rss'] - base_rss)} | {' | '.join(extra)} |")
    client, full = results["client"], results["full"]
    lines += ["", f"full / client peak RSS: {full['peak_rss'] / client['peak_rss']:.2f}x "
                  f"(over the import baseline: {(full['peak_rss'] - base_rss) / (client['peak_rss'] - base_rss):.2f}x)",
              "", "client peak over the baseline, accounted for:"]
    blocks = client["frozen_bytes"] - (GPT2_SMALL["vocab_size"] + GPT2_SMALL["n_positions"]) * GPT2_SMALL["n_embd"] * 4
    parts = {"token + position embeddings (float32)": client["frozen_bytes"] - blocks,
             f"{args.split_layer} blocks (float32)": blocks,
             "LoRA weights + grads + 2 AdamW moments": 4 * client["lora_bytes"],
             "activations saved for backward": client["saved_bytes"],
             "cut activations + their gradient": 2 * client["cut_bytes"]}
    parts["rest: freed memory malloc keeps, backward temporaries"] = client["peak_rss"] - base_rss - sum(parts.values())
    for name, value in parts.items():
        lines.append(f"  {name:<54} {mib(value)} MiB")
    lines.append(f"  {'measured peak RSS over the baseline':<54} {mib(client['peak_rss'] - base_rss)} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--split-layer", type=int, default=3)
    parser.add_argument("--child", choices=["write", "baseline", "client", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "write":
        write_checkpoint(args.model_dir)
    elif args.child:
        print(json.dumps(child(args.child, args.model_dir, args)))
    else:
        main_parent(args)


def main_parent(args: argparse.Namespace) -> None:
    """Write the checkpoint and measure each mode in its own process."""
    # The parent stays small (no torch): Linux carries a process's peak RSS across exec into a forked child.
    with tempfile.TemporaryDirectory(prefix="splitlora-bench-") as tmp:
        model_dir = Path(tmp) / "gpt2-small-random"
        subprocess.run([sys.executable, __file__, "--child", "write", "--model-dir", str(model_dir)], check=True)
        results = {mode: measure(mode, model_dir, args) for mode in ("baseline", "client", "full")}
    print(report(results, args))


if __name__ == "__main__":
    main()
