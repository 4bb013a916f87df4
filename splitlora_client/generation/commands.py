"""`splitlora-client generate` and `splitlora-client evaluate`: the split model, prompts in, completions out."""
from __future__ import annotations

import json
import logging
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from common.data import encode, load_examples
from common.fingerprint import compute_fingerprint
from common.lora import from_bytes
from common.split.parts import SplitPart
from common.split.ushape import load_client_adapter, u_shape_parts
from common.tls import open_channel
from common.wire import codec_from_name
from splitlora_client.generation.e2e_metrics import IMPLEMENTATIONS, e2e_scores, group_references
from splitlora_client.generation.model import SplitCausalLM
from splitlora_client.generation.options import DecodingOptions, EvaluateConfig, GenerateConfig, SplitModelOptions
from splitlora_client.generation.remote import RemoteSession
from splitlora_client.generation.scoring import validate

log = logging.getLogger("splitlora.client")


class SplitRunner:
    """This client's part with its adapter, a channel to the server, the tokenizer: generate and score."""

    def __init__(self, cfg: SplitModelOptions) -> None:
        self.cfg = cfg
        model_dir = cfg.model_dir()
        lora = cfg.lora_settings()
        self.fingerprint = compute_fingerprint(model_dir, cfg.split_layer, lora, cfg.u_shape, cfg.top_blocks)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(model_dir), local_files_only=True)
        self.tokenizer.padding_side = "left"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.part, self.top = self._parts(model_dir, lora)
        adapter = cfg.adapter_file()
        if adapter is not None:
            load_client_adapter(self.part.peft, self.top.peft if self.top is not None else None,
                                from_bytes(adapter.read_bytes()))
        self.channel = open_channel(cfg.server, cfg, cfg.grpc_options())
        self.codec = codec_from_name(cfg.codec)
        self.model = SplitCausalLM(self.part, self._session, self.codec, self.top)

    def _parts(self, model_dir: Path, lora) -> tuple[SplitPart, SplitPart | None]:
        """The client's part and, in u-shape mode, its top part (blocks [L-J, L), the final norm and the head)."""
        cfg = self.cfg
        if not cfg.u_shape:
            return SplitPart(model_dir, "client", cfg.split_layer, lora, cfg.dtype).eval(), None
        bottom, _, top = u_shape_parts(model_dir, cfg.split_layer, cfg.top_blocks)
        return (SplitPart(model_dir, bottom, None, lora, cfg.dtype).eval(),
                SplitPart(model_dir, top, None, lora, cfg.dtype).eval())

    def _session(self) -> RemoteSession:
        return RemoteSession(self.channel, self.cfg.client_id, self.cfg.server_adapter,
                             reply="hidden" if self.top is not None else "logits", chunk_bytes=self.cfg.chunk_bytes,
                             vocab_size=self.part.vocab_size, fingerprint=self.fingerprint)

    def complete(self, prompts: Sequence[str], decoding: DecodingOptions, streamer: BaseStreamer | None = None
                 ) -> list[tuple[str, int]]:
        """The completion of each prompt (cut at the first stop string) and its number of new tokens."""
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = decoding.generation_kwargs(self.tokenizer.eos_token_id, self.pad_id)
        if decoding.stop:
            kwargs.update(stop_strings=list(decoding.stop), tokenizer=self.tokenizer)
        torch.manual_seed(decoding.seed)
        out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  streamer=streamer, **kwargs)
        results, eos = [], self.tokenizer.eos_token_id
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            ids = row[:row.index(eos)] if decoding.eos and eos in row else row
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in decoding.stop:
                text = text.split(stop)[0]
            results.append((text.strip(), len(ids)))
        return results

    def close(self) -> None:
        self.channel.close()


class _StdoutStreamer(BaseStreamer):
    """Prints the tokens of a single prompt as they arrive (the prompt itself is skipped)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.seen, self.ids, self.printed = tokenizer, False, [], 0

    def put(self, value: torch.Tensor) -> None:
        if not self.seen:  # the first call carries the prompt
            self.seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """The prompts of --prompt, --prompts FILE (text lines or JSONL context/text; '-' = stdin), else stdin."""
    if cfg.prompt:
        return [cfg.prompt]
    lines = (Path(cfg.prompts).read_text(encoding="utf-8") if cfg.prompts not in ("", "-")
             else sys.stdin.read()).splitlines()
    prompts = []
    for line in filter(str.strip, lines):
        if line.lstrip().startswith("{"):
            obj = json.loads(line)
            prompts.append(str(obj.get("context") or obj.get("text") or ""))
        else:
            prompts.append(line.split("||")[0])
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT, --prompts FILE, or lines on stdin")
    return prompts


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate(cfg: GenerateConfig) -> int:
    """Run `splitlora-client generate`."""
    prompts = read_prompts(cfg)
    runner = SplitRunner(cfg)
    out = open(cfg.results, "w", encoding="utf-8") if cfg.results else None
    try:
        for batch in _batches(prompts, cfg.batch_size):
            stream = len(batch) == 1 and cfg.num_beams == 1
            completions = runner.complete(batch, cfg, _StdoutStreamer(runner.tokenizer) if stream else None)
            for prompt, (text, tokens) in zip(batch, completions):
                if not stream:
                    print(text, flush=True)
                if out is not None:
                    out.write(json.dumps({"prompt": prompt, "completion": text, "tokens": tokens}) + "\n")
                    out.flush()
        m = runner.model
        log.info("%d prompts; %d server steps, %.0f bytes sent and %.0f received per step", len(prompts), m.steps,
                 m.bytes_sent / max(m.steps, 1), m.bytes_received / max(m.steps, 1))
    finally:
        if out is not None:
            out.close()
        runner.close()
    return 0


def evaluate(cfg: EvaluateConfig) -> int:
    """Run `splitlora-client evaluate`: print (and write) a JSON summary."""
    examples = load_examples(cfg.data)
    runner = SplitRunner(cfg)
    try:
        encoded = [encode(runner.tokenizer, ex, cfg.max_seq_len) for ex in examples]
        result = validate(runner.part, runner.channel, cfg.client_id, encoded, cfg.batch_size, runner.pad_id,
                          runner.fingerprint, cfg.server_adapter, codec=runner.codec, top=runner.top)
        summary = {"data": cfg.data, "examples": len(examples), "tokens": result.tokens, "loss": result.loss,
                   "perplexity": result.perplexity}
        paired = [ex for ex in examples if ex.context is not None]
        if cfg.metrics and paired:
            grouped = group_references([ex.context for ex in paired], [ex.completion for ex in paired])
            contexts = list(grouped)[:cfg.max_contexts or None]
            outputs = [text for batch in _batches(contexts, cfg.batch_size)
                       for text, _ in runner.complete(batch, cfg)]
            summary["generation"] = {"contexts": len(contexts), **e2e_scores(outputs, [grouped[c] for c in contexts]),
                                     "implementations": IMPLEMENTATIONS}
            if cfg.results:
                _write_outputs(Path(cfg.results).with_suffix(".outputs.jsonl"), OrderedDict(zip(contexts, outputs)))
    finally:
        runner.close()
    text = json.dumps(summary, indent=2)
    print(text)
    if cfg.results:
        Path(cfg.results).write_text(text + "\n", encoding="utf-8")
    return 0


def _write_outputs(path: Path, outputs: "OrderedDict[str, str]") -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for context, text in outputs.items():
            handle.write(json.dumps({"context": context, "output": text}) + "\n")
