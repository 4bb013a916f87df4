"""Config sections both roles share: the model, its split and its LoRA adapters, and the transport."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.builtin import ensure_builtin_model
from common.config.engine import ConfigError, option
from common.split.parts import DTYPES, LoraSettings
from common.weights import looks_local, resolve_model_dir


@dataclass
class ModelOptions:
    """Which model, where it is cut, and the LoRA adapters on it."""

    HELP_GROUP = "LoRA"  # --help section of the options below, except:
    HELP_GROUPS = {"model": "essentials", "split_layer": "essentials", "dtype": "advanced"}

    model: str = option("", "Local Hugging Face model directory (config.json + safetensors), or a hub id (needs "
                            "a network). Empty: the built-in tiny GPT-2, created once under $SPLITLORA_HOME.")
    split_layer: int = option(3, "Blocks [0, K) run on the client, [K, L) on the server (with --split-range: the "
                                 "K of clients that choose none).")
    dtype: str = option("float32", "dtype of the frozen base weights; LoRA weights stay float32.",
                        choices=sorted(DTYPES))
    lora_r: int = option(4, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = option(0.1, "Dropout on the LoRA input.")
    lora_targets: list[str] = option([], "Module names to adapt, comma-separated (empty: the family's default, "
                                         "c_attn for GPT-2; `all-linear`: every linear layer but the output "
                                         "layer, as in peft). A module on one side only (embeddings, head) is "
                                         "adapted where it is.")
    lora_rslora: bool = option(False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    lora_dora: bool = option(False, "DoRA: weight-decomposed LoRA (a learned magnitude per output feature).")
    split_range: str = option("", "Per-client split points: K_MIN:K_MAX, the split layers (both ends included) a "
                                  "client may choose (splitlora-client train --split-layer K or auto); the server "
                                  "holds blocks [K_MIN, L) and runs [K_i, L) for client i. Empty: every client "
                                  "uses --split-layer.", metavar="K_MIN:K_MAX")

    def model_dir(self) -> Path:
        """The model directory: local as given, a hub snapshot, or the built-in tiny model when empty."""
        return resolve_model_dir(self.model) if self.model else ensure_builtin_model()

    def lora_settings(self) -> LoraSettings:
        """The LoRA settings as the split code takes them."""
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets),
                            rslora=self.lora_rslora, dora=self.lora_dora)

    def split_bounds(self) -> tuple[int, int]:
        """(K_min, K_max) of --split-range, both included; (K, K) without one. ConfigError when malformed."""
        if not self.split_range:
            return self.split_layer, self.split_layer
        low, sep, high = str(self.split_range).partition(":")
        try:
            bounds = int(low), int(high)
        except ValueError:
            bounds = (0, -1)
        if not sep or not 1 <= bounds[0] <= bounds[1]:
            raise ConfigError(f"split_range must be K_MIN:K_MAX with 1 <= K_MIN <= K_MAX, got {self.split_range!r}")
        return bounds

    def validate_model(self) -> None:
        """Checks shared by every role that loads a model."""
        if self.model and looks_local(self.model) and not Path(self.model).expanduser().is_dir():
            raise ConfigError(f"model: {self.model} is not a directory (give a local Hugging Face model directory)")
        if self.split_layer < 1:
            raise ConfigError(f"split_layer must be at least 1, got {self.split_layer}")
        low, high = self.split_bounds()
        if not low <= self.split_layer <= high:
            raise ConfigError(f"split_layer {self.split_layer} is outside --split-range {low}:{high}")
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be at least 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


# Keepalive pings every 30 s find dead peers during long waits (a FetchGlobal can wait a whole round); the
# server-side half lets clients ping that often while no data flows, instead of answering GOAWAY too_many_pings.
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000), ("grpc.http2.max_ping_strikes", 0)]


@dataclass
class TransportOptions:
    """gRPC message limits and chunking."""

    max_message_bytes: int = option(64 << 20, "Largest gRPC message accepted or sent, in bytes.")
    chunk_bytes: int = option(4 << 20, "Frames larger than this are sent in pieces, in bytes.")

    def validate_transport(self) -> None:
        """Chunks must fit in a message with room for the envelope."""
        if self.chunk_bytes < 1024:
            raise ConfigError(f"chunk_bytes must be at least 1024, got {self.chunk_bytes}")
        if self.chunk_bytes + 4096 > self.max_message_bytes:
            raise ConfigError(f"chunk_bytes ({self.chunk_bytes}) must be at least 4 KiB below max_message_bytes "
                              f"({self.max_message_bytes})")

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options that set the message limits deliberately on this end."""
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes), *KEEPALIVE_OPTIONS]
