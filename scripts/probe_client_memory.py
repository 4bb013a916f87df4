"""Where a client part's memory goes: RSS (and the peak since the previous phase) after the imports, after
building the client part with its quantization, and over training steps with a random gradient standing in for
the server's. A diagnostic of one process, not a benchmark (`bench_quantized_client.py` measures the real
`splitlora-client train` process); it uses the client's own low-memory settings (`common.heap`) as the client does.

    python scripts/probe_client_memory.py --model DIR --split-layer 4 --quantization int8 [--gradient-checkpointing]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def report(phase: str) -> None:
    s = status()
    print(f"{phase:<34} RSS {s['VmRSS'] / 1024:7.1f} MiB   peak since the last line {s['VmHWM'] / 1024:7.1f} MiB",
          flush=True)
    reset_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--split-layer", type=int, required=True)
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--glibc-default-heap", action="store_true",
                        help="leave glibc's dynamic mmap threshold as it is (the client pins it when quantized)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=4)
    args = parser.parse_args()
    reset_peak()
    import torch

    from common.heap import keep_heap_small
    from common.split.parts import LoraSettings, SplitPart
    report("imports (torch, transformers, peft)")
    if args.quantization != "none" and not args.glibc_default_heap:
        keep_heap_small()  # what `splitlora-client train` does with a quantized base
    part = SplitPart(args.model, "client", args.split_layer, LoraSettings(r=args.lora_r), quantization=args.quantization,
                     gradient_checkpointing=args.gradient_checkpointing).train()
    report(f"client part built ({args.quantization})")
    params = [p for p in part.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    vocab = int(part.config.vocab_size)
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(step))
        mask = torch.ones_like(ids)
        positions = torch.arange(args.seq_len).expand(args.batch_size, -1)
        hidden = part(ids, mask, positions)
        report(f"step {step}: forward (graph kept)")
        hidden.backward(torch.randn(hidden.shape, generator=torch.Generator().manual_seed(100 + step)))
        optim.step()
        optim.zero_grad(set_to_none=True)
        del hidden
        report(f"step {step}: backward + AdamW")


if __name__ == "__main__":
    main()
