"""The options of every benchmark, one dataclass; defaults are the full runs recorded in docs/benchmarks.md."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config.engine import ConfigError, option
from common.split.parts import LoraSettings

PROFILES = Path(__file__).with_name("profiles.yaml")


@dataclass
class BenchConfig:
    """`splitlora-bench`: measure overhead, wire codecs, server scaling, time to target, edge links and generation."""

    out: str = option("runs/bench", "Directory for the JSON, Markdown and PNG results.")
    train_data: str = option("../shared/data/e2e/valid.txt", "Fine-tuning examples (E2E `context||completion` "
                                                             "lines).")
    eval_data: str = option("", "Held-out examples for the validation loss; empty: the first --eval-examples lines "
                                "of --train-data. Training never sees a held-out example's context.")
    eval_examples: int = option(128, "Held-out examples evaluated (the first N).")
    tokenizer: str = option("../shared/data/gpt2-tokenizer", "Tokenizer directory (GPT-2's real tokenizer).")
    model: str = option("", "Model directory with its tokenizer; empty: build a random-init GPT-2-shaped model "
                            "(--n-layer x --n-embd) with --tokenizer under OUT/models.")
    n_layer: int = option(6, "Blocks of the generated model.")
    n_embd: int = option(256, "Width of the generated model.")
    n_head: int = option(4, "Attention heads of the generated model.")
    embedding_std: float = option(0.02, "Init std of the generated model's token embeddings (= its tied head).")
    pretrain_steps: int = option(150, "Steps of pretraining the generated base model (every parameter, next-token "
                                      "loss) before any LoRA; 0: a random base (see splitlora_bench/pretrain.py).")
    pretrain_batch: int = option(16, "Lines per pretraining step.")
    pretrain_learning_rate: float = option(1e-3, "AdamW learning rate of the pretraining.")
    pretrain_data: str = option("../shared/data/e2e/test.txt", "Lines the generated base is pretrained on (minus "
                                                                "the held-out contexts).")
    split_layer: int = option(2, "Blocks [0, K) on the client.")
    batch_size: int = option(8, "Examples per client step.")
    max_seq_len: int = option(128, "Longest sequence in tokens.")
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha.")
    lora_dropout: float = option(0.1, "LoRA dropout.")
    lora_targets: list[str] = option(["c_attn", "c_proj", "c_fc"], "LoRA target modules (the paper adapts c_attn "
                                                                   "of GPT-2 medium; a small base needs more).")
    learning_rate: float = option(1e-3, "AdamW learning rate of the LoRA fine-tuning.")
    warmup_steps: int = option(10, "Warm-up steps.")
    seed: int = option(0, "Seed of LoRA init, data order and dropout.")
    threads: int = option(2, "torch threads of every process the benchmark starts.")
    overhead_shapes: list[str] = option(["6x256", "12x768"], "Model shapes LAYERSxWIDTH timed by `overhead` "
                                                             "(12x768 is GPT-2 small).")
    overhead_steps: int = option(10, "Timed steps per mode (after --overhead-warmup), split and local interleaved.")
    overhead_warmup: int = option(1, "Untimed steps per mode first.")
    overhead_repeats: int = option(2, "Runs of `overhead`: the split run and the baselines take turns this many times "
                                      "(each split run starts its server and client afresh).")
    pipeline_micro_batches: list[int] = option([1, 2, 4], "Micro-batches per step timed by `pipeline` (1: whole "
                                                          "steps).")
    wire_codecs: list[str] = option(["float32", "float16", "bfloat16", "int8"], "Codecs compared by `wire`.")
    wire_rounds: int = option(2, "Rounds of each `wire` run (one client).")
    wire_local_steps: int = option(20, "Steps per round of each `wire` run.")
    scaling_clients: list[int] = option([1, 2, 4, 8], "Concurrent clients measured by `scaling`.")
    scaling_seconds: float = option(10.0, "Seconds of each measurement.")
    scaling_repeats: int = option(2, "Measurements per point (batching off and on alternate).")
    scaling_warmup_s: float = option(3.0, "Unmeasured seconds before each point.")
    scaling_shapes: list[str] = option(["8x64", "1x16"], "Steps the load generators send, BATCHxTOKENS: an E2E-"
                                                        "sized step, and a small one where fixed costs dominate.")
    generate_shapes: list[str] = option(["12x768"], "Model shapes LAYERSxWIDTH timed by `generate` (12x768: GPT-2 "
                                                    "small).")
    generate_tokens: int = option(32, "Tokens generated per prompt by `generate`.")
    generate_prompts: int = option(8, "Prompts (held-out contexts) timed by `generate`.")
    generate_sessions: list[int] = option([1, 4, 16], "Concurrent sessions measured by `generate`.")
    batch_window_ms: float = option(5.0, "Batch window of the server when batching is on.")
    clients: int = option(3, "Clients of `time-to-target` (FedLoRA and SplitLoRA).")
    rounds: int = option(8, "Rounds of `time-to-target`.")
    local_steps: int = option(6, "Steps per client per round of `time-to-target`.")
    target_loss: float = option(0.0, "Validation loss that counts as reached; 0: the best loss every method reaches.")
    profiles: str = option(str(PROFILES), "YAML file of device profiles for the modeled wall time.")
    project_shapes: list[str] = option(["12x768"], "Also model the time-to-target wall time with the per-step "
                                                   "cost of these shapes (12x768: GPT-2 small), same curves.")
    aggregation_strategies: list[str] = option(["fedavg", "ffa", "fedex"], "Strategies compared by `aggregation`.")
    aggregation_clients: list[int] = option([3, 8], "Client counts of `aggregation`.")
    partitions: list[str] = option(["iid", "dirichlet"], "Partitions of `aggregation`: iid shards, dirichlet over "
                                                         "eatType/food/area of the meaning representation.")
    dirichlet_alpha: float = option(0.3, "Concentration of the dirichlet partition (small: more skewed).")
    edge_rates_mbit: list[int] = option([20, 100, 0], "Link rates of `edge-link`, Mbit/s each way per client "
                                                      "(0: the same links without a limit).")
    edge_codecs: list[str] = option(["float32", "int8"], "Codecs of `edge-link`.")
    edge_clients: list[int] = option([1, 3], "Client counts of `edge-link` (with one, the link is not hidden behind "
                                             "other clients' turns at the server).")
    edge_steps: int = option(12, "Steps per client of each `edge-link` run.")
    edge_repeats: int = option(2, "Runs of every `edge-link` configuration.")

    privacy_split_layers: list[int] = option([1, 4], "Split layers K of `privacy` (the first also runs int8, "
                                                     "u-shape).")
    privacy_codecs: list[str] = option(["float32", "int8"], "Codecs of `privacy` (undefended, at the first K).")
    privacy_noise: list[float] = option([0.5, 2.0], "Noise multipliers sigma of `privacy` (std = sigma x C, C the "
                                                    "median per-token norm of h_K on public text).")
    privacy_nopeek: list[float] = option([1.0, 4.0], "NoPeek distance-correlation weights of `privacy`.")
    privacy_combined: list[str] = option([], "NoPeek and noise together in `privacy`, as W+S entries (NoPeek "
                                             "weight W, noise multiplier S), at every K.")
    privacy_top_blocks: int = option(1, "J of the u-shape runs of `privacy`.")
    privacy_steps: int = option(12, "Training steps of each `privacy` run (the same budget for every setting).")
    privacy_sequences: int = option(16, "Captured sequences each `privacy` attack reconstructs.")
    privacy_public_lines: int = option(512, "Public lines the `privacy` attacker trains its decoder on.")
    privacy_decoder_steps: int = option(300, "Training steps of the learning-based inversion decoder.")
    privacy_opt_steps: int = option(150, "Steps of the optimization-based inversion.")

    def validate(self) -> None:
        """Reject settings that cannot work."""
        for name in ("eval_examples", "batch_size", "overhead_steps", "wire_rounds", "wire_local_steps", "clients",
                     "rounds", "local_steps", "edge_steps", "threads", "scaling_repeats", "edge_repeats",
                     "overhead_repeats", "pretrain_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.dirichlet_alpha > 0 or min(self.aggregation_clients, default=1) < 1:
            raise ConfigError("dirichlet_alpha must be > 0 and aggregation_clients at least 1")
        if self.pretrain_steps < 0:
            raise ConfigError(f"pretrain_steps must be 0 or more, got {self.pretrain_steps}")
        if self.generate_tokens < 2 or self.generate_prompts < 1 or min(self.generate_sessions, default=0) < 1:
            raise ConfigError("generate_tokens must be at least 2, generate_prompts and generate_sessions at least 1")
        for shape in [*self.overhead_shapes, *self.scaling_shapes, *self.project_shapes, *self.generate_shapes]:
            parse_shape(shape)
        for spec in self.privacy_combined:
            parse_combined(spec)
        if not self.model and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"tokenizer: {self.tokenizer} is not a directory (give --tokenizer or --model)")

    @property
    def out_dir(self) -> Path:
        """Where results go."""
        return Path(self.out)

    def lora(self) -> LoraSettings:
        """The LoRA settings of every run."""
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def lora_flags(self) -> list[str]:
        """The same settings as command-line flags of the server and client."""
        return ["--lora-r", str(self.lora_r), "--lora-alpha", str(self.lora_alpha), "--lora-dropout",
                str(self.lora_dropout), "--lora-targets", ",".join(self.lora_targets)]


def parse_combined(spec: str) -> tuple[float, float]:
    """A --privacy-combined entry 'W+S' -> (NoPeek weight W, noise multiplier S), both > 0."""
    weight, _, sigma = spec.partition("+")
    try:
        w, s = float(weight), float(sigma)
    except ValueError:
        w = s = 0.0
    if not (w > 0 and s > 0):
        raise ConfigError(f"privacy_combined: {spec!r} is not W+S with both > 0 (NoPeek weight + noise multiplier, "
                          "e.g. 4+0.25)")
    return w, s


def parse_shape(shape: str) -> tuple[int, int]:
    """'12x768' -> (12, 768) (model LAYERSxWIDTH, or step ROWSxTOKENS)."""
    try:
        first, second = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise ConfigError(f"shape {shape!r} is not NxM, e.g. 12x768") from None
    return first, second
