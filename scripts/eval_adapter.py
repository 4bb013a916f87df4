"""Held-out loss of an exported adapter against its base model: the container check's last stage.

Loads MODEL with transformers and ADAPTER with `peft.PeftModel.from_pretrained`, draws fresh synthetic E2E-style
examples (a seed other than the demo shards', minus any whose context a shard holds) and prints the mean
completion-token cross-entropy with and without the adapter. Exits 1 unless the adapter's loss is lower.

    python scripts/eval_adapter.py --model MODEL_DIR --adapter ADAPTER_DIR --train docker/data/*.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.data import collate, encode, load_examples, synthetic_e2e  # noqa: E402
from common.loss import causal_lm_loss  # noqa: E402


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy over the labelled (completion) tokens of `batches`."""
    total, tokens = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
        loss, n = causal_lm_loss(logits, b["labels"])
        total, tokens = total + float(loss) * n, tokens + n
    return total / max(tokens, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the base model directory the run trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="the exported PEFT adapter directory")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="the training shards (excluded)")
    parser.add_argument("--examples", type=int, default=200, help="held-out examples to score")
    parser.add_argument("--seed", type=int, default=1007, help="seed of the held-out draw")
    parser.add_argument("--max-len", type=int, default=128)
    args = parser.parse_args()
    seen = {ex.context for path in args.train for ex in load_examples(path)}
    held_out = [ex for ex in synthetic_e2e(args.examples, seed=args.seed) if ex.context not in seen]
    if not held_out:
        print("every held-out example's context is in the training shards", file=sys.stderr)
        return 1
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = [encode(tokenizer, ex, args.max_len) for ex in held_out]
    batches = [collate(items[i:i + 16], pad) for i in range(0, len(items), 16)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(args.model)), str(args.adapter))
    model.eval()
    tuned = mean_loss(model, batches)
    with model.disable_adapter():
        base = mean_loss(model, batches)
    verdict = "lower" if tuned < base else "NOT lower"
    print(f"held-out loss on {len(held_out)} examples: base {base:.4f}, base + adapter {tuned:.4f} ({verdict})")
    return 0 if tuned < base else 1


if __name__ == "__main__":
    raise SystemExit(main())
