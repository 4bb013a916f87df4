"""Tests for common.config.engine: flags, YAML merging, errors, help, masking."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from common.config.engine import (
    ConfigError,
    add_arguments,
    format_config,
    option,
    resolve,
    save_yaml,
    to_dict,
)


@dataclass
class DemoConfig:
    """A config exercising every supported field type."""

    model: str = option("gpt2", "Model name or path.", short="-m")
    split_layer: int = option(3, "Index of the layer where the model is split.")
    lr: float = option(1e-4, "Learning rate.")
    use_amp: bool = option(False, "Use mixed precision.")
    shuffle: bool = option(True, "Shuffle the data.")
    seed: int | None = option(None, "Random seed; none for random.")
    limit: float | None = option(None, "Optional limit.")
    run_name: str | None = option(None, "Run name.")
    targets: list[str] = option(["q_proj", "v_proj"], "LoRA target modules.")
    device: Literal["cpu", "cuda"] = option("cpu", "Device to run on.")
    dtype: str = option("float32", "Tensor dtype.", choices=["float32", "bfloat16"])
    address: str = option("localhost:50051", "Server address.", flag="--server")
    token: str = option("", "Authentication token; 100% private.", secret=True)
    rounds: int = option(10, "Number of federated rounds.")

    def validate(self) -> None:
        """Reject inconsistent values."""
        if self.rounds <= 0:
            raise ConfigError(f"rounds must be positive, got {self.rounds}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--config")
    add_arguments(parser, DemoConfig)
    return parser


def _resolve(argv: list[str], yaml_text: str | None = None, tmp_path: Path | None = None) -> DemoConfig:
    args = _parser().parse_args(argv)
    path = None
    if yaml_text is not None:
        assert tmp_path is not None
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml_text)
    return resolve(DemoConfig, args, path)


def test_defaults_only() -> None:
    cfg = _resolve([])
    assert cfg == DemoConfig()
    assert cfg.targets == ["q_proj", "v_proj"] and cfg.targets is not DemoConfig().targets


def test_unset_flags_absent_from_namespace() -> None:
    args = _parser().parse_args(["--rounds", "4"])
    assert vars(args) == {"config": None, "rounds": 4}


def test_precedence_default_yaml_flag(tmp_path: Path) -> None:
    text = "split_layer: 5\nlr: 0.01\nuse-amp: true\nmodel: llama\ntargets: [a, b]\nrounds: 7\n"
    cfg = _resolve(["--split-layer", "8", "--lr", "0.5", "--no-use-amp", "-m", "opt", "--targets", "x"], text, tmp_path)
    assert (cfg.split_layer, cfg.lr, cfg.use_amp, cfg.model, cfg.targets) == (8, 0.5, False, "opt", ["x"])
    assert cfg.rounds == 7  # YAML beats default when no flag
    assert cfg.device == "cpu"  # default when neither


def test_yaml_beats_default(tmp_path: Path) -> None:
    cfg = _resolve([], "split-layer: 6\nlr: 1e-3\nshuffle: false\nseed: 42\n", tmp_path)
    assert (cfg.split_layer, cfg.lr, cfg.shuffle, cfg.seed) == (6, 1e-3, False, 42)


def test_bool_flags_both_ways() -> None:
    assert _resolve(["--use-amp"]).use_amp is True
    assert _resolve(["--no-shuffle"]).shuffle is False
    assert _resolve(["--shuffle"]).shuffle is True


def test_list_parsing(tmp_path: Path) -> None:
    assert _resolve(["--targets", "q_proj, k_proj,,v_proj"]).targets == ["q_proj", "k_proj", "v_proj"]
    assert _resolve([], "targets: [o_proj]\n", tmp_path).targets == ["o_proj"]
    assert _resolve([], "targets: a,b\n", tmp_path).targets == ["a", "b"]
    with pytest.raises(ConfigError, match=r"targets: expected a list, got 3"):
        _resolve([], "targets: 3\n", tmp_path)


def test_optional_fields(tmp_path: Path) -> None:
    cfg = _resolve(["--seed", "7", "--limit", "2.5", "--run-name", "exp1"])
    assert (cfg.seed, cfg.limit, cfg.run_name) == (7, 2.5, "exp1")
    assert _resolve(["--seed", "none"]).seed is None
    assert _resolve(["--seed", "none"], "seed: 3\n", tmp_path).seed is None
    assert _resolve([], "seed: null\nrun_name: ~\n", tmp_path).seed is None


def test_unknown_key_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _resolve([], "split_layr: 2\n", tmp_path)
    message = str(info.value)
    assert "unknown key 'split_layr'" in message
    assert "did you mean 'split_layer'?" in message
    assert "valid keys:" in message and "rounds" in message and "targets" in message


def test_type_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^rounds: expected an integer, got 'abc'$"):
        _resolve([], "rounds: abc\n", tmp_path)
    with pytest.raises(ConfigError, match=r"lr: expected a number, got 'fast'"):
        _resolve([], "lr: fast\n", tmp_path)
    with pytest.raises(ConfigError, match=r"use_amp: expected true or false, got 'maybe'"):
        _resolve([], "use_amp: maybe\n", tmp_path)
    with pytest.raises(ConfigError, match=r"rounds: expected an integer, got None"):
        _resolve([], "rounds:\n", tmp_path)
    with pytest.raises(ConfigError, match=r"model: expected a string, got True"):
        _resolve([], "model: yes\n", tmp_path)


def test_type_error_on_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--rounds", "abc"])
    assert "argument --rounds: expected an integer, got 'abc'" in capsys.readouterr().err


def test_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _resolve(["--device", "cuda", "--dtype", "bfloat16"]).device == "cuda"
    with pytest.raises(ConfigError, match=r"device: expected one of cpu, cuda, got 'tpu'"):
        _resolve([], "device: tpu\n", tmp_path)
    with pytest.raises(ConfigError, match=r"dtype: expected one of float32, bfloat16, got 'int8'"):
        _resolve([], "dtype: int8\n", tmp_path)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--device", "tpu"])
    assert "expected one of cpu, cuda, got 'tpu'" in capsys.readouterr().err


def test_custom_flag_name() -> None:
    assert _resolve(["--server", "host:1"]).address == "host:1"


def test_help_lists_help_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for fragment in [
        "Index of the layer where the model is split. (default: 3)",
        "--split-layer", "--use-amp Use mixed precision.", "-m MODEL, --model MODEL",
        "Learning rate. (default: 0.0001)", "(default: q_proj,v_proj)", "Random seed; none for random. --limit",
        "{cpu,cuda}", "{float32,bfloat16}", "--server", "100% private. --rounds",
        "--shuffle, --no-shuffle Shuffle the data. (default: on)",
    ]:
        assert fragment in out, fragment
    for noise in ("(default: '')", "(default: None)", "--no-use-amp", "(default: False)"):
        assert noise not in out, noise


@dataclass
class Grouped(DemoConfig):
    """The same options in --help sections."""

    HELP_GROUPS = {"model": "essentials", "rounds": "schedule", "lr": "schedule", "token": "transport security"}


def test_help_sections_start_with_what_matters(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="demo")
    add_arguments(parser, Grouped)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    starts = [out.index(title + ":") for title in ("essentials", "schedule", "transport security", "advanced")]
    assert starts == sorted(starts)
    assert out.index("Model name or path.") < out.index("schedule:") < out.index("Number of federated rounds.") \
        < out.index("advanced:") < out.index("Index of the layer where the model is split.")


def test_secret_masking() -> None:
    cfg = _resolve(["--token", "hunter2"])
    text = format_config(cfg)
    assert "hunter2" not in text
    assert "token:" in text and "***" in text
    assert "split_layer: 3" in text and "targets:" in text and "q_proj,v_proj" in text
    assert "token:" in format_config(DemoConfig()) and "***" not in format_config(DemoConfig())


def test_validate_hook(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rounds must be positive, got 0"):
        _resolve(["--rounds", "0"])
    with pytest.raises(ConfigError, match="rounds must be positive, got -1"):
        _resolve([], "rounds: -1\n", tmp_path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        resolve(DemoConfig, argparse.Namespace(), tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        _resolve([], "- a\n- b\n", tmp_path)
    assert _resolve([], "", tmp_path) == DemoConfig()


def test_to_dict_and_save_yaml_roundtrip(tmp_path: Path) -> None:
    cfg = _resolve(["--split-layer", "4", "--token", "s3cret", "--targets", "a,b"])
    data = to_dict(cfg)
    assert data["split_layer"] == 4 and data["targets"] == ["a", "b"]
    path = tmp_path / "out" / "saved.yaml"
    save_yaml(cfg, path)
    saved = yaml.safe_load(path.read_text())
    assert "token" not in saved
    reloaded = resolve(DemoConfig, argparse.Namespace(), path)
    assert reloaded.split_layer == 4 and reloaded.targets == ["a", "b"] and reloaded.token == ""
    save_yaml(cfg, path, include_secrets=True)
    assert resolve(DemoConfig, argparse.Namespace(), path).token == "s3cret"


def test_required_field_and_unsupported_type() -> None:
    @dataclass
    class Needs:
        name: str = option(help="Required name.")

    with pytest.raises(ConfigError, match=r"missing required option\(s\): name \(--name\)"):
        resolve(Needs, argparse.Namespace())

    @dataclass
    class Bad:
        mapping: dict = option({}, "Unsupported.")

    with pytest.raises(TypeError, match="unsupported"):
        add_arguments(argparse.ArgumentParser(), Bad)
