"""Typed configs of `splitlora-client generate` and `splitlora-client evaluate`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config.engine import ConfigError, option
from common.config.sections import ModelOptions, TransportOptions
from common.tls import ClientTlsOptions
from common.wire import CODEC_NAMES

CLIENT_ADAPTER_FILE = "client_adapter.safetensors"  # what `train` writes to its --output


@dataclass
class SplitModelOptions(ModelOptions, TransportOptions, ClientTlsOptions):
    """The split model to run: this client's part and adapter, and the server's adapter."""

    server: str = option("127.0.0.1:50051", "Split server address host:port.")
    client_id: str = option("client-0", "This client's id (the identity the server checks).")
    tokenizer: str = option("", "Local tokenizer directory; empty: the model directory.")
    output: str = option("", "The client's training --output (its adapter is read from there); empty: "
                             "runs/<client-id>.")
    adapter: str = option("", "Client adapter (.safetensors): empty: the latest global client adapter in --output; "
                              "'none': no LoRA on the client.")
    server_adapter: str = option("shared", "Server adapter: the shared trained one, this client's per-client copy "
                                           "(own), or none.", choices=["shared", "own", "none"])
    codec: str = option("float32", "Codec of the activations sent.", choices=sorted(CODEC_NAMES))

    def adapter_file(self) -> Path | None:
        """The client adapter to load, or None for none."""
        if self.adapter == "none":
            return None
        default = Path(self.output or f"runs/{self.client_id}") / CLIENT_ADAPTER_FILE
        path = Path(self.adapter) if self.adapter else default
        if not path.is_file():
            raise ConfigError(f"adapter: {path} does not exist; train first, give --adapter FILE, or --adapter none")
        return path

    def validate_split_model(self) -> None:
        self.validate_model()
        self.validate_transport()
        self.validate_tls()
        self.adapter_file()
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"tokenizer: {self.tokenizer} is not a directory")


@dataclass
class DecodingOptions:
    """How tokens are chosen (transformers' GenerationConfig semantics)."""

    max_new_tokens: int = option(64, "Most tokens generated per prompt.")
    sample: bool = option(False, "Sample (with --temperature, --top-k, --top-p) instead of greedy/beam search.")
    temperature: float = option(1.0, "Sampling temperature.")
    top_k: int = option(50, "Sampling: keep the k most likely tokens (0: all).")
    top_p: float = option(1.0, "Sampling: keep the smallest set of tokens with this probability mass.")
    seed: int = option(0, "Seed of sampling.")
    num_beams: int = option(1, "Beam search with this many beams (1: off).")
    stop: list[str] = option([], "Stop strings: a sequence ends when its text contains one (cut off in results).")
    eos: bool = option(True, "End a sequence at the tokenizer's end-of-sequence token.")
    batch_size: int = option(1, "Prompts per batch (left-padded); 1 streams tokens as they come.")

    def validate_decoding(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens, num_beams and batch_size must be at least 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("temperature must be > 0, top_p in (0, 1], top_k >= 0")

    def generation_kwargs(self, eos_id: int | None, pad_id: int) -> dict:
        """Keyword arguments of transformers' `generate`."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sample, "num_beams": self.num_beams,
                  "eos_token_id": eos_id if self.eos else None, "pad_token_id": pad_id}
        if self.sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs


@dataclass
class GenerateConfig(SplitModelOptions, DecodingOptions):
    """`splitlora-client generate`: complete prompts through the split (the client holds its part and adapter)."""

    prompt: str = option("", "One prompt; empty: prompts from --prompts, else one per line of stdin.")
    prompts: str = option("", "File of prompts: one per line, or JSONL with `context` (or `text`); '-': stdin.",
                          metavar="FILE")
    results: str = option("", "Write one JSON object per prompt (prompt, completion, tokens) to this file.",
                          metavar="FILE")

    def validate(self) -> None:
        self.validate_split_model()
        self.validate_decoding()
        if self.prompts not in ("", "-") and not Path(self.prompts).is_file():
            raise ConfigError(f"prompts: file {self.prompts} does not exist")


@dataclass
class EvaluateConfig(SplitModelOptions, DecodingOptions):
    """`splitlora-client evaluate`: loss and perplexity of a held-out file through the split (nothing learns), and
    for `context||completion` data the E2E generation metrics."""

    data: str = option("", "Held-out data: E2E lines 'context||completion' or JSONL (context/completion or text).",
                       metavar="FILE")
    max_seq_len: int = option(512, "Longest sequence scored (tokens).")
    metrics: bool = option(True, "For context||completion data: generate one output per distinct context and "
                                 "score BLEU, NIST, METEOR, ROUGE-L, CIDEr against its references.")
    max_contexts: int = option(0, "Generate for at most this many distinct contexts (0: all).")
    results: str = option("", "Write the summary (JSON) to this file, and the outputs next to it (.outputs.jsonl).",
                          metavar="FILE")

    def validate(self) -> None:
        self.validate_split_model()
        self.validate_decoding()
        if not self.data or not Path(self.data).is_file():
            raise ConfigError(f"data: file {self.data!r} does not exist")
        if self.max_seq_len < 2:
            raise ConfigError("max_seq_len must be at least 2")
