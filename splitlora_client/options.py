"""Typed config of `splitlora-client train`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.config.engine import ConfigError, option
from common.config.sections import ModelOptions, TransportOptions
from common.defenses import DefenseSettings
from common.plan import pinnable, unpinned_copy
from common.split.quantize import QUANTIZATIONS, QuantizationError, check_quantization
from common.threads import ThreadOptions
from common.tls import ClientTlsOptions
from common.wire import CODEC_NAMES
from splitlora_client.split_choice import AUTO, parse_memory, parse_split_choice
from splitlora_client.scalars import TENSORBOARD_HINT, tensorboard_available

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):\d{1,5}$")


@dataclass
class TrainConfig(pinnable(ModelOptions), TransportOptions, ClientTlsOptions, ThreadOptions):
    """`splitlora-client train`: run the embeddings and first blocks on private data, train through the server.
    The split layer and LoRA options come from the server unless given here (then they must match it)."""

    HELP_GROUPS = {n: "essentials" for n in ("server", "model", "data", "client_id", "output", "tokenizer",
                                             "shard_index", "shard_count")}

    split_layer: str | None = option(None, "Blocks [0, K) run here: K inside the server's --split-range (a K the "
                                           "server does not allow is refused, naming its range), or auto: the "
                                           "largest K whose memory estimate fits --max-memory. Not given: the "
                                           "server's --split-layer.", default_text="the server's", metavar="K|auto")
    max_memory: str = option("", "With --split-layer auto: this client's memory budget for training (e.g. 2GiB, "
                                 "512MB); the choice and its estimate are printed.", metavar="SIZE")
    server: str = option("127.0.0.1:50051", "Split server address host:port.")
    aggregator: str = option("", "Aggregator address host:port; empty: the one the server names at Join, "
                                 "else the server's own address.")
    client_id: str = option("client-0", "This client's id (letters, digits, '.', '_', '-').")
    tokenizer: str = option("", "Local tokenizer directory; empty: the model directory.")
    data: str = option("", "Private training data: E2E lines 'context||completion', JSONL with "
                           "context/completion, or JSONL with text. Empty: built-in synthetic E2E-style data.")
    shard_index: int = option(0, "Use shard i of the data file (IID split by line), with --shard-count.")
    shard_count: int = option(1, "Number of shards the data file is split into.")
    builtin_examples: int = option(512, "Examples of built-in synthetic data (when --data is empty).")
    seed: int = option(0, "Seed of this client's data order and dropout.")
    output: str = option("", "Directory for this client's adapter and metrics; empty: runs/<client-id>.")
    codecs: list[str] = option(["float32"], "Activation/gradient codecs this client offers, in order of preference.")
    overlap: bool = option(True, "Prepare (collate) the next batch while waiting for the server's gradient; "
                                 "the results are the same either way.")
    micro_batches: int = option(0, "Pipelined steps: split each batch into this many micro-batches, sent one after "
                                   "another so this client computes the next while the server works (same result "
                                   "as whole steps; 0: the server's --micro-batches). Use 2-4 (at least 2 rows "
                                   "each) when client and server run on separate devices, 1 when they share cores "
                                   "(docs/benchmarks.md).")
    client_quantization: str = option("none", "The frozen base of this client's part (embeddings, blocks) in int8 "
                                              "(quantized as it is read; int4 is refused on the CPU: torchao's CPU int4 "
                                              "kernel has no backward); LoRA stays float32.",
                                      choices=list(QUANTIZATIONS))
    gradient_checkpointing: bool = option(False, "Recompute this client's blocks' activations in the backward "
                                                 "pass instead of keeping them through the server's round trip "
                                                 "(less memory, more compute; the same results).")
    join_timeout: float = option(60.0, "Seconds to keep trying to reach the server at start.")
    round_timeout: float = option(3600.0, "Seconds to wait for a round's global adapter.")
    reconnect_timeout: float = option(900.0, "After losing the server or the aggregator, seconds to keep trying to "
                                             "reach it again before giving up.")
    reconnect_backoff_max: float = option(10.0, "Longest wait between two reconnection attempts (exponential "
                                                "backoff from 0.1 s).")
    eval_data: str = option("", "Held-out data of this client (same formats as --data): the validation loss of the "
                                "global model is computed through the split after rounds (nothing learns from it).",
                            metavar="FILE")
    eval_every: int = option(1, "With --eval-data: evaluate after every this many rounds (and after the last).")
    progress: bool = option(True, "Show a progress bar.")
    tensorboard: bool = option(False, "Also write TensorBoard scalars to OUTPUT/tensorboard (needs tensorboardX).")
    defense_clip: float = option(0.0, "Activation defense: clip each token's cut activation to this L2 norm before "
                                      "sending (0: off). See docs/privacy.md.")
    defense_noise: float = option(0.0, "Activation defense: add Gaussian noise of std NOISE x CLIP to each clipped "
                                       "activation (needs --defense-clip; 0: off).")
    defense_nopeek: float = option(0.0, "NoPeek: weight of the distance-correlation loss between the input "
                                        "embeddings and the sent activations (0: off).")

    def validate(self) -> None:
        """Reject settings that cannot work, with the reason."""
        choice = parse_split_choice(self.split_layer)
        unpinned = unpinned_copy(self)
        unpinned.split_layer = choice if isinstance(choice, int) else ModelOptions.split_layer
        if self.split_mode is None and self.top_blocks:  # J pinned alone: the mode is the plan's, checked there
            unpinned.split_mode = "u-shape"
        unpinned.validate_model()
        if self.max_memory:
            parse_memory(self.max_memory)
        if choice == AUTO and not self.max_memory:
            raise ConfigError("--split-layer auto needs --max-memory (this client's memory budget, e.g. 2GiB)")
        try:
            self.defense_settings().check()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.validate_transport()
        self.validate_tls()
        self.validate_threads()
        try:
            check_quantization(self.client_quantization)  # the client part runs on the CPU
        except QuantizationError as err:
            raise ConfigError(f"client_quantization: {err}") from None
        if self.micro_batches < 0:
            raise ConfigError(f"micro_batches must be >= 0, got {self.micro_batches}")
        for name in ("server", "aggregator"):
            value = getattr(self, name)
            if value and not _ADDRESS.match(value):
                raise ConfigError(f"{name}: {value!r} is not host:port")
        if self.data and not Path(self.data).is_file():
            raise ConfigError(f"data: file {self.data} does not exist")
        if self.eval_data and not Path(self.eval_data).is_file():
            raise ConfigError(f"eval_data: file {self.eval_data} does not exist")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be at least 1, got {self.eval_every}")
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"tokenizer: {self.tokenizer} is not a directory")
        if self.reconnect_timeout < 0 or self.reconnect_backoff_max <= 0:
            raise ConfigError("reconnect_timeout must be >= 0 and reconnect_backoff_max > 0")
        if not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"shard_index must be in [0, shard_count), got {self.shard_index}/{self.shard_count}")
        unknown = [c for c in self.codecs if c not in CODEC_NAMES]
        if unknown or not self.codecs:
            raise ConfigError(f"codecs: unknown {unknown}; choose from float32, float16, bfloat16, int8")
        if self.tensorboard and not tensorboard_available():
            raise ConfigError(TENSORBOARD_HINT)

    def defense_settings(self) -> DefenseSettings:
        """The activation defenses this client applies before sending."""
        return DefenseSettings(self.defense_clip, self.defense_noise, self.defense_nopeek)

    @property
    def output_dir(self) -> Path:
        """Where this client writes its files."""
        return Path(self.output or f"runs/{self.client_id}")
