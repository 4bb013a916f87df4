"""Typed configs of the server's commands: serve, aggregate, export."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from common.aggregation import DEFAULT_TRIM_FRACTION, MODES, Strategy, StrategyOptions, build_strategy
from common.config.engine import ConfigError, option
from common.config.sections import ModelOptions, TransportOptions
from common.threads import ThreadOptions
from common.tls import ServerTlsOptions
from common.optim import capped_warmup
from common.plan import pinnable, unpinned_copy
from common.wire import CODEC_NAMES
from splitlora_server.admission import AdmissionOptions
from splitlora_server.generation.sessions import GenerationOptions
from splitlora_server.rounds.gate import Quorum


@dataclass
class AuthOptions:
    """Where client identities come from besides mTLS certificates."""

    HELP_GROUP = "transport security"

    tokens_file: str = option("", "Bearer tokens file (identity -> sha256 of the token) made with `splitlora-server "
                                  "tokens add`; callers then need a token or a client certificate.", metavar="FILE")

    def validate_auth(self) -> None:
        """The tokens file exists."""
        if self.tokens_file and not Path(self.tokens_file).is_file():
            raise ConfigError(f"tokens_file: {self.tokens_file} does not exist; create it with "
                              "`splitlora-server tokens add ID --tokens-file FILE`")


@dataclass
class AggregationOptions:
    """How the aggregator combines the clients' adapters each round."""

    HELP_GROUP = "federation"

    aggregation: str = option("fedavg", "fedavg: sample-weighted mean of A and B (inexact for B·A); ffa: A frozen "
                                        "at its initialisation, B averaged (exact); fedex: A and B averaged plus "
                                        "the residual folded into the base weights (exact); median / trimmed-mean: "
                                        "coordinate-wise, each client counted once, robust to a minority of bad "
                                        "clients. Per-client server adapters follow it too.",
                              choices=sorted(MODES))
    clip_norm: float = option(0.0, "Clip each client's update (its adapter minus the previous global adapter) to "
                                   "this L2 norm before combining (0: off).")
    trim_fraction: float = option(DEFAULT_TRIM_FRACTION, "trimmed-mean: fraction of clients dropped at each end "
                                                         "of every coordinate.")

    def strategy(self) -> Strategy:
        """The aggregation strategy these options name."""
        return build_strategy(self.aggregation, self.clip_norm, StrategyOptions(self.trim_fraction))

    def validate_aggregation(self, clients: int) -> None:
        """Settings that protect something with `clients` clients per round."""
        if not (self.clip_norm >= 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"clip_norm must be a finite number >= 0, got {self.clip_norm}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.aggregation == "trimmed-mean" and math.floor(self.trim_fraction * clients) == 0:
            if clients < 3:  # trimming one client at each end needs a third to keep
                raise ConfigError(f"trimmed-mean needs at least 3 clients (it drops one at each end of every "
                                  f"coordinate); with {clients} use --aggregation median or fedavg")
            least = math.ceil(1000 / clients) / 1000  # rounded up: the advised value must trim one client
            raise ConfigError(f"trimmed-mean with --trim-fraction {self.trim_fraction} and {clients} clients trims "
                              f"no client; raise --trim-fraction to at least {least:g}")


@dataclass
class RoundOptions:
    """Dropouts and stragglers: when a round may close without every client."""

    HELP_GROUP = "federation"

    min_clients: int = option(0, "Quorum: the fewest clients a round may close with once its deadline has passed "
                                 "(0: all of --clients). Without the quorum the round waits.")
    round_deadline: float = option(0.0, "Seconds the others wait for stragglers after the first client is done "
                                        "with a round (0: wait for every client). Give serve and aggregate the "
                                        "same value.")

    def quorum(self, clients: int) -> Quorum:
        """The round-closing rule of these options."""
        return Quorum(clients, self.min_clients, self.round_deadline)

    def validate_rounds(self, clients: int) -> None:
        if not 0 <= self.min_clients <= clients:
            raise ConfigError(f"min_clients must be in [0, clients={clients}], got {self.min_clients}")
        if self.round_deadline < 0:
            raise ConfigError(f"round_deadline must be >= 0, got {self.round_deadline}")


@dataclass
class ServeConfig(ModelOptions, TransportOptions, ServerTlsOptions, AuthOptions, AggregationOptions,
                  RoundOptions, AdmissionOptions, GenerationOptions, ThreadOptions):
    """`splitlora-server serve`: the split-training service (and, by default, the aggregator)."""

    HELP_GROUPS = {**{n: "essentials" for n in ("model", "split_layer", "split_range", "host", "port", "clients",
                                                "output", "init_adapter")},
                   **{n: "schedule" for n in ("rounds", "local_steps", "batch_size", "learning_rate", "warmup_steps",
                                              "weight_decay", "max_grad_norm", "label_smoothing", "max_seq_len",
                                              "seed")},
                   "aggregator": "federation", "private_server_adapter": "federation"}

    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    port: int = option(50051, "Port to listen on (0: pick a free one and print it).")
    clients: int = option(3, "Clients expected in each round.")
    rounds: int = option(5, "Federated rounds.")
    local_steps: int = option(33, "Client steps per round between two aggregations.")
    batch_size: int = option(8, "Examples per client step (the largest batch the server accepts).")
    learning_rate: float = option(2e-4, "AdamW learning rate, on both sides.")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    warmup_steps: int = option(500, "Linear warm-up steps of the learning rate.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    label_smoothing: float = option(0.1, "Label smoothing of the cross-entropy loss.")
    max_seq_len: int = option(512, "Longest sequence (tokens) a client may send; capped by the model's positions.")
    seed: int = option(0, "Seed of the LoRA initialization, server dropout and the clients' shared init.")
    server_adapter_mode: str = option("shared", "shared: one server adapter updated by every client step; "
                                      "per-client: a copy per client, averaged at each round end.",
                                      choices=["shared", "per-client"])
    max_batch_clients: int = option(1, "Cross-client batching (shared adapter mode): stack up to this many clients' "
                                       "waiting steps into one forward/backward (0 or 1: off).")
    micro_batches: int = option(1, "Pipelined steps: micro-batches per client step for clients that do not ask for "
                                   "a number at Join (1: whole steps); the client computes micro-batch i+1 while "
                                   "the server works on i, with the same result as a whole step. 1 by measurement "
                                   "(docs/benchmarks.md): micro-batches pay only where client and server have cores "
                                   "of their own (2-4 micro-batches of 2+ rows: 4-10 percent faster) and cost "
                                   "25-55 percent where they share them.")
    batch_window_ms: float = option(0.0, "With batching on, how long the server waits for other clients' steps "
                                         "before running a batch (0: only steps already waiting).")
    device: str = option("cpu", "Device of the server part (cpu, cuda, cuda:0, ...; auto: cuda when a GPU is "
                                "visible, else cpu).")
    gradient_checkpointing: bool = option(False, "Recompute the server blocks' activations in the backward pass "
                                                 "instead of keeping them (less memory, more compute).")
    output: str = option("runs/server", "Directory for the exported adapter, checkpoints and metrics.")
    aggregator: str = option("", "Address host:port of a separate aggregator; empty: run it in this process.")
    codecs: list[str] = option(["float32", "float16", "bfloat16", "int8"],
                               "Activation/gradient codecs the server accepts, in its order of preference.")
    max_workers: int = option(128, "gRPC handler threads (a training stream and a round wait per client, plus "
                                   "room: at least 4 per concurrent client).")
    max_adapter_bytes: int = option(512 << 20, "Largest client adapter the aggregator accepts, in bytes.")
    finish_grace_seconds: float = option(30.0, "After the last round, how long to wait for clients to fetch the "
                                               "final adapter before shutting down.")
    metrics_port: int = option(0, "Serve Prometheus metrics at http://HOST:PORT/metrics on this port; 0: off.")
    init_adapter: str = option("", "Start both sides from this whole-model PEFT adapter directory (e.g. an earlier "
                                   "run's export), checked against the model and the LoRA options.", metavar="DIR")
    private_server_adapter: bool = option(False, "Keep the server adapter on the server: clients do not receive "
                                                 "the whole-model adapter at the end.")

    def validate(self) -> None:
        """Reject settings that cannot work, with the reason."""
        self.validate_model()
        if self.init_adapter and not Path(self.init_adapter, "adapter_model.safetensors").is_file():
            raise ConfigError(f"init_adapter: {self.init_adapter} holds no adapter_model.safetensors (give a PEFT "
                              "adapter directory, e.g. an earlier run's runs/server/adapter)")
        self.validate_transport()
        self.validate_tls()
        self.validate_auth()
        self.validate_aggregation(self.clients)
        self.validate_split_range()
        if self.device == "auto":  # resolved here so that the logged effective config shows the choice
            import torch
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.validate_rounds(self.clients)
        self.validate_generation()
        self.validate_threads()
        if not 1 <= self.micro_batches <= self.batch_size:
            raise ConfigError(f"micro_batches must be between 1 and batch_size ({self.batch_size}), "
                              f"got {self.micro_batches}")
        if self.u_shape and self.init_adapter:
            raise ConfigError("--init-adapter is not supported with --split-mode u-shape yet (the client's top "
                              "blocks and head would need their share of it)")
        for name in ("clients", "rounds", "local_steps", "batch_size", "max_seq_len", "max_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.validate_admission(self.max_workers)
        if self.max_batch_clients < 0 or self.batch_window_ms < 0:
            raise ConfigError("max_batch_clients and batch_window_ms must be >= 0")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        self.warmup_steps = capped_warmup(self.warmup_steps, self.rounds * self.local_steps)
        unknown = [c for c in self.codecs if c not in CODEC_NAMES]
        if unknown or not self.codecs:
            raise ConfigError(f"codecs: unknown {unknown}; choose from float32, float16, bfloat16, int8")


    def validate_split_range(self) -> None:
        """What per-client split points (--split-range) do not combine with, and why."""
        low, high = self.split_bounds()
        if high == low:
            return
        refused = [("--aggregator", bool(self.aggregator), "the blocks trained on both sides are averaged with "
                    "the server's copies, so the aggregator must run in the server's process (leave it empty)"),
                   ("--aggregation fedex", self.aggregation == "fedex", "fedex's residuals of blocks trained on "
                    "both sides would have to be folded on both sides, which is not implemented (use fedavg, ffa, "
                    "median or trimmed-mean)"),
                   ("--init-adapter", bool(self.init_adapter), "an initial adapter is handed out for one split "
                    "layer only")]
        for flag, active, why in refused:
            if active:
                raise ConfigError(f"--split-range {self.split_range} cannot be combined with {flag}: {why}")


@dataclass
class AggregateConfig(ModelOptions, TransportOptions, ServerTlsOptions, AuthOptions,
                      AggregationOptions, RoundOptions, AdmissionOptions):
    """`splitlora-server aggregate`: the aggregator alone, for deployments where the split server must not
    see client adapters. Give it the model, split and LoRA flags of the run: the adapters it accepts must have
    the layout they define."""

    HELP_GROUPS = {"host": "essentials", "port": "essentials", "clients": "essentials", "output": "essentials",
                   "rounds": "schedule"}

    host: str = option("127.0.0.1", "Address to listen on.")
    port: int = option(50052, "Port to listen on.")
    clients: int = option(3, "Clients expected in each round.")
    rounds: int = option(5, "Federated rounds.")
    output: str = option("runs/aggregator", "Directory for the global adapters of each round.")
    max_adapter_bytes: int = option(512 << 20, "Largest client adapter accepted, in bytes.")
    max_workers: int = option(64, "gRPC handler threads.")
    finish_grace_seconds: float = option(30.0, "After the last round, how long to wait for clients to fetch the "
                                               "final adapter before shutting down.")
    metrics_port: int = option(0, "Serve Prometheus metrics at http://HOST:PORT/metrics on this port; 0: off.")

    def validate(self) -> None:
        """Reject settings that cannot work."""
        self.validate_rounds(self.clients)
        self.validate_model()
        if self.split_bounds()[1] > self.split_bounds()[0]:
            raise ConfigError("--split-range: per-client split points average the split server's copies of the "
                              "blocks trained on both sides with the clients' adapters, so the aggregator runs in "
                              "the split server's process (splitlora-server serve without --aggregator)")
        for name in ("clients", "rounds", "max_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.validate_admission(self.max_workers)
        self.validate_transport()
        self.validate_tls()
        self.validate_auth()
        self.validate_aggregation(self.clients)
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {getattr(self, name)}")


@dataclass
class ExportConfig(pinnable(ModelOptions, "the adapters'")):
    """`splitlora-server export`: merge a client global adapter and a server adapter into one PEFT adapter. The
    model, split layer and LoRA options come from the adapter files; options given are checked against them."""

    HELP_GROUPS = {n: "essentials" for n in ("client_adapter", "aggregator_dir", "server_adapter", "output",
                                             "model")}

    client_adapter: str = option("", "Client-side global adapter (.safetensors), e.g. <aggregator output>/global/"
                                     "round-0004.safetensors. Empty: the newest under --aggregator-dir.",
                                 metavar="FILE")
    aggregator_dir: str = option("runs/aggregator", "Aggregator output directory (used when --client-adapter "
                                                    "is empty).", metavar="DIR")
    server_adapter: str = option("runs/server/server_adapter.safetensors", "Server-side adapter (.safetensors).",
                                 metavar="FILE")
    output: str = option("runs/export", "Directory to write the whole-model PEFT adapter to.", metavar="DIR")

    def validate(self) -> None:
        """Checks of the options given (the rest come from the adapter files)."""
        unpinned_copy(self).validate_model()
