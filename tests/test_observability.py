"""What an operator sees: `status`, `health` and the Prometheus endpoint, against a real server on loopback."""
from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.rpc.splitlora.v1 import split_pb2 as spb
from splitlora_server import healthcheck
from splitlora_server.cli import main as server_main
from splitlora_server.ops.metrics import AggregatorCollector, SplitServerCollector, metrics_for, start_metrics_server
from splitlora_server.ops.status import format_status, human_bytes
from tests.support.servers import ClientSide, Harness, exchange, join, running_server, train_ok, valid_forward


@pytest.fixture(scope="module")
def busy_server(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Harness:
    """A server where alice trained two steps and bob sent one step out of order."""
    with running_server(builtin_model_dir, tmp_path_factory.mktemp("status")) as harness:
        client = ClientSide(builtin_model_dir)
        local = harness.config.local_steps
        alice, bob = join(harness, "alice"), join(harness, "bob")
        train_ok(harness, alice.metadata, valid_forward(client, 0, local), valid_forward(client, 1, local))
        _, err = exchange(harness, bob.metadata, [spb.ClientFrame(forward=valid_forward(client, 2, local))])
        assert err is not None
        yield harness


def _exit_code(argv: list[str]) -> int:
    try:
        return server_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_status_prints_clients_round_rate_bytes_and_last_error(busy_server: Harness, capsys) -> None:
    assert _exit_code(["status", "--server", busy_server.address, "--insecure"]) == 0
    out = capsys.readouterr().out
    head, columns, *rows = out.strip().splitlines()
    assert head.startswith(f"server {busy_server.address}: training, round 0 of 0-1, 2 steps,") and "steps/s" in head
    assert "0/2 clients connected" in head
    assert columns.split()[:4] == ["client", "connected", "round", "steps"] and "last error" in columns
    alice = next(r for r in rows if r.startswith("alice"))
    bob = next(r for r in rows if r.startswith("bob"))
    assert alice.split()[:4] == ["alice", "no", "0", "2"] and alice.rstrip().endswith("-")
    assert "KiB" in alice  # bytes in and out
    assert "FAILED_PRECONDITION: step 2 is out of order" in bob


def test_status_json_is_the_whole_reply(busy_server: Harness, capsys) -> None:
    assert _exit_code(["status", "--server", busy_server.address, "--insecure", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"] == "2" and data["rounds"] == 2 and data["finished"] is False
    by_id = {c["client_id"]: c for c in data["clients"]}
    assert int(by_id["alice"]["bytes_in"]) > 0 and by_id["bob"]["last_error"].startswith("FAILED_PRECONDITION")


def test_status_of_a_server_that_is_not_there_is_one_line_and_exit_1(capsys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    assert _exit_code(["status", "--server", f"127.0.0.1:{port}", "--insecure", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--server", "127.0.0.1:1"], "give --tls-ca FILE"),
    (["--server", "127.0.0.1:1", "--insecure", "--tls-ca", "ca.pem"], "--insecure cannot be combined with --tls-ca"),
    (["--server", "127.0.0.1:1", "--tls-ca", "missing-ca.pem"], "does not exist"),
    (["--server", "nohostport", "--insecure"], "not host:port"),
])
def test_status_needs_tls_files_or_insecure(argv: list[str], message: str, capsys) -> None:
    assert _exit_code(["status", *argv]) == 2
    assert message in capsys.readouterr().err


def test_format_status_before_any_client_and_per_client_rates() -> None:
    empty = spb.StatusReply(round=0, rounds=3, steps=0, server_adapter_mode="shared")
    assert format_status(empty, "h:1").endswith("(no client has joined yet)")
    reply = spb.StatusReply(round=3, rounds=3, steps=9, finished=True, clients=[
        spb.ClientStatus(client_id="a", round=3, steps=9, last_loss=float("nan"), bytes_in=2048, bytes_out=10)])
    text = format_status(reply, "h:1", rates={"a": 1.5})
    assert "finished, all 3 rounds done" in text and "1.50" in text and "2.0 KiB" in text and "10 B" in text
    assert [human_bytes(n) for n in (0, 1536, 5 << 20)] == ["0 B", "1.5 KiB", "5.0 MiB"]


def test_health_probe_serving_unknown_service_and_down(busy_server: Harness, capsys) -> None:
    base = ["--server", busy_server.address, "--insecure", "--timeout", "5"]
    assert healthcheck.main(base) == 0
    assert healthcheck.main([*base, "--service", "splitlora.v1.Aggregator"]) == 0
    assert healthcheck.main([*base, "--service", "no.such.Service"]) == 1
    assert _exit_code(["health", *base]) == 0
    assert healthcheck.main(["--server", "127.0.0.1:1", "--insecure", "--timeout", "1"]) == 1
    assert healthcheck.main(["--server", "127.0.0.1:1"]) == 1  # config error: neither TLS nor --insecure
    out = capsys.readouterr().out
    assert f"{busy_server.address}: SERVING" in out and "unhealthy: NOT_FOUND" in out


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list, **labels: str) -> float:
    return next(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_prometheus_endpoint_agrees_with_status(busy_server: Harness) -> None:
    running = busy_server.running
    metrics = start_metrics_server("127.0.0.1", 0, SplitServerCollector(running.registry),
                                   AggregatorCollector(running.aggregator))
    try:
        families = _scrape(metrics.port)
    finally:
        metrics.stop()
    status = {c.client_id: c for c in busy_server.status().clients}
    assert _value(families["splitlora_steps"]) == 2
    assert _value(families["splitlora_clients_joined"]) == 2 and _value(families["splitlora_rounds"]) == 2
    assert _value(families["splitlora_client_steps"], client="alice") == status["alice"].steps == 2
    assert _value(families["splitlora_client_received_bytes"], client="alice") == status["alice"].bytes_in
    assert _value(families["splitlora_client_sent_bytes"], client="alice") == status["alice"].bytes_out
    assert _value(families["splitlora_client_errors"], client="bob") == 1
    assert _value(families["splitlora_client_errors"], client="alice") == 0
    assert _value(families["splitlora_aggregator_open_round"]) == 0
    assert _value(families["splitlora_aggregator_submissions"]) == 0


def test_metrics_port_zero_is_off_and_a_taken_port_is_one_clear_error() -> None:
    assert metrics_for("127.0.0.1", 0) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match="choose another --metrics-port"):
            metrics_for("127.0.0.1", taken.getsockname()[1])


def test_client_healthcheck_follows_the_metrics_file(tmp_path: Path, capsys) -> None:
    import os
    import time

    from splitlora_client import healthcheck as client_health

    metrics = tmp_path / "metrics.jsonl"
    assert client_health.main(["--metrics", str(metrics)]) == 1  # nothing written yet
    metrics.write_text("{}\n")
    assert client_health.main(["--metrics", str(metrics), "--max-age", "60"]) == 0
    old = time.time() - 120
    os.utime(metrics, (old, old))
    assert client_health.main(["--metrics", str(metrics), "--max-age", "60"]) == 1
    (tmp_path / "client_adapter.safetensors").write_bytes(b"")
    assert client_health.main(["--metrics", str(metrics), "--max-age", "60"]) == 0  # finished
    assert "no progress for" in capsys.readouterr().out


def test_device_auto_picks_the_gpu_only_when_one_is_visible(builtin_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from splitlora_server.options import ServeConfig

    cfg = ServeConfig(model=str(builtin_model_dir), device="auto", output=str(tmp_path), insecure=True)
    cfg.validate()
    assert cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")
