"""The command lines: help, bad config and bad input end in one clear message and a non-zero exit."""
from __future__ import annotations

from pathlib import Path

import pytest

from splitlora_client.cli import main as client_main
from splitlora_server.cli import main as server_main


def _exit_code(fn, argv: list[str]) -> int:
    try:
        return fn(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_help_lists_every_option(capsys):
    assert _exit_code(server_main, ["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--split-layer", "--host", "--port", "--clients", "--rounds", "--local-steps",
                 "--batch-size", "--seed", "--output", "--config", "--server-adapter-mode", "--aggregator"):
        assert flag in text
    assert _exit_code(client_main, ["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--server", "--model", "--tokenizer", "--data", "--client-id", "--seed", "--output", "--aggregator"):
        assert flag in text


def test_missing_model_directory_is_a_config_error(capsys, tmp_path: Path):
    assert _exit_code(server_main, ["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_missing_data_file_is_a_config_error(capsys, tmp_path: Path):
    assert _exit_code(client_main, ["train", "--insecure", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_yaml_config_unknown_key_suggests_the_right_one(capsys, tmp_path: Path):
    config = tmp_path / "server.yaml"
    config.write_text("rounds: 2\nsplit_layr: 2\n")
    assert _exit_code(server_main, ["serve", "--config", str(config)]) == 2
    assert "did you mean 'split_layer'" in capsys.readouterr().err


def test_split_layer_out_of_range_is_one_clear_line(capsys, builtin_model_dir: Path):
    code = _exit_code(server_main, ["serve", "--insecure", "--model", str(builtin_model_dir), "--split-layer", "6",
                                      "--port", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "split layer 6 is outside [1, 5]" in err and "Traceback" not in err


def test_bad_server_address_is_a_config_error(capsys):
    assert _exit_code(client_main, ["train", "--insecure", "--server", "no-port-here"]) == 2
    assert "is not host:port" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["bogus"]])
def test_no_or_unknown_command(argv, capsys):
    assert _exit_code(server_main, argv) == 2


def test_hub_id_offline_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _exit_code(server_main, ["serve", "--insecure", "--model", "no-such-org/no-such-model", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "could not be downloaded from the Hugging Face hub" in err and "Traceback" not in err


def test_evaluate_with_no_server_is_one_clear_line(capsys, tmp_path: Path, builtin_model_dir: Path):
    """A gRPC error of generate/evaluate is explained in one line (not a traceback of the explanation itself)."""
    from splitlora_bench.procs import free_port

    data = tmp_path / "held_out.txt"
    data.write_text("name[The Eagle]||The Eagle is a pub.\n")
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    code = _exit_code(client_main, ["evaluate", "--insecure", "--server", address, "--model", str(builtin_model_dir),
                                    "--adapter", "none", "--data", str(data), "--no-metrics"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"splitlora-client: could not reach the split server at {address} over plaintext (--insecure) (last error: " \
           "UNAVAILABLE" in out
    assert "Traceback" not in out and "NameError" not in out
