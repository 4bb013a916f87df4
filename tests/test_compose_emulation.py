"""Compose files run as separate hosts: one network namespace and one process per service, real TCP between
private addresses, service names from hosts files, volumes as temp dirs, depends_on and health checks honoured.

The first test brings up a compose file written here with the flags of this branch (aggregator, server, two
clients, a one-shot data service and a one-shot export); the second brings up docker/docker-compose.yml itself
(mutual TLS: it needs issue 4's `certs` command and TLS flags).
"""
from __future__ import annotations

import json
import re
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from common.data import synthetic_e2e, write_examples
from compose_emulator import ComposeRun, load_project, netns_unavailable_reason
from tests.support.compose import certs_command_available

ROOT = Path(__file__).resolve().parent.parent
_NO_NETNS = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(_NO_NETNS is not None, reason=f"network namespaces unavailable: {_NO_NETNS}")

LORA = '"--lora-targets", "c_attn,c_fc"'
HEALTH = '["CMD", "python", "-m", "splitlora_server.healthcheck", "--server", "localhost:{port}", "--insecure"]'
COMPOSE = f"""
x-env: &env
  SPLITLORA_HOME: /model
  OMP_NUM_THREADS: "1"
x-client: &client
  depends_on:
    server: {{condition: service_healthy}}
    data: {{condition: service_completed_successfully}}
  environment: *env
services:
  data:       # one-shot: puts each client's shard into the shared volume
    command: ["sh", "-c", "cp /seed/alice.txt /seed/bob.txt /shards/"]
    volumes: ["./seed:/seed:ro", "shards:/shards"]
  aggregator:
    command: ["splitlora-server", "aggregate", "--host", "0.0.0.0", "--port", "50052", "--clients", "2",
              "--rounds", "2", "--output", "/results/aggregator", "--metrics-port", "9101", "--log-format", "json",
              "--finish-grace-seconds", "20", "--insecure"]
    volumes: ["results:/results"]
    healthcheck: {{test: {HEALTH.format(port=50052)}, interval: 0.5s, timeout: 5s, retries: 3, start_period: 60s}}
  server:
    command: ["splitlora-server", "serve", "--host", "0.0.0.0", "--port", "50051", "--aggregator", "aggregator:50052",
              "--clients", "2", "--rounds", "2", "--local-steps", "6", "--batch-size", "4", "--warmup-steps", "1",
              "--learning-rate", "1e-2", {LORA}, "--output", "/results/server", "--metrics-port", "9100",
              "--finish-grace-seconds", "20", "--insecure"]
    environment: *env
    volumes: ["results:/results", "model:/model"]
    depends_on: {{aggregator: {{condition: service_healthy}}}}
    healthcheck: {{test: {HEALTH.format(port=50051)}, interval: 0.5s, timeout: 5s, retries: 3, start_period: 60s}}
  alice:
    <<: *client
    command: ["splitlora-client", "train", "--server", "server:50051", "--client-id", "alice", "--seed", "0",
              "--data", "/shards/alice.txt", "--output", "/out", "--no-progress", "--log-format", "json", "--insecure", {LORA}]
    volumes: ["shards:/shards:ro", "model:/model:ro", "alice-out:/out"]
  bob:
    <<: *client
    command: ["splitlora-client", "train", "--server", "server:50051", "--client-id", "bob", "--seed", "1",
              "--data", "/shards/bob.txt", "--output", "/out", "--no-progress", "--insecure", {LORA}]
    volumes: ["shards:/shards:ro", "model:/model:ro", "bob-out:/out"]
  export:     # one-shot after both servers finished: the whole-model adapter
    command: ["splitlora-server", "export", "--aggregator-dir", "/results/aggregator", "--server-adapter",
              "/results/server/server_adapter.safetensors", "--output", "/results/adapter", {LORA}]
    environment: *env
    volumes: ["results:/results", "model:/model:ro"]
    depends_on:
      server: {{condition: service_completed_successfully}}
      aggregator: {{condition: service_completed_successfully}}
volumes: {{shards: {{}}, results: {{}}, model: {{}}, alice-out: {{}}, bob-out: {{}}}}
"""
SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen('http://server:9100/metrics', timeout=2).read().decode())")


def _environment() -> dict[str, str]:
    """What the images provide: the project's console scripts and python first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1"}


def _explain(run: ComposeRun) -> str:
    logs = sorted((run.root / "logs").glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


def _scrape_while_training(run: ComposeRun, seen: list[str], stop: threading.Event) -> None:
    """From the `data` host: poll the server's metrics by name until both clients show up with steps."""
    if not run.wait_healthy("server", 60):
        return
    while not stop.is_set():
        done = run.exec("data", ["python", "-c", SCRAPE], timeout=10)
        if done.returncode == 0:
            seen.append(done.stdout)
            if 'splitlora_client_steps_total{client="bob"}' in done.stdout and \
                    'splitlora_client_steps_total{client="alice"}' in done.stdout:
                return
        time.sleep(0.3)


def test_compose_file_runs_as_separate_hosts(tmp_path: Path) -> None:
    compose = tmp_path / "project" / "docker-compose.yml"
    (compose.parent / "seed").mkdir(parents=True)
    compose.write_text(COMPOSE)
    for i, name in enumerate(("alice", "bob")):
        write_examples(compose.parent / "seed" / f"{name}.txt", synthetic_e2e(60, seed=100 + i))
    project = load_project(compose, {})
    started = time.monotonic()
    seen: list[str] = []
    stop = threading.Event()
    with ComposeRun(project, tmp_path / "run", _environment(), timeout=150) as run:
        scraper = threading.Thread(target=_scrape_while_training, args=(run, seen, stop), daemon=True)
        scraper.start()
        result = run.wait()
        stop.set()
        scraper.join(15)
        addresses = {name: run.address(name) for name in run.order}
        volume = run.volumes.named
        assert result.ok, f"{result.failure}\n{_explain(run)}"
    assert result.exit_codes == dict.fromkeys(("data", "aggregator", "server", "alice", "bob", "export"), 0)
    assert len(set(addresses.values())) == len(addresses)  # every service on its own address

    # the demo trained two rounds on each client and the one-shot exported the whole-model adapter
    exported = load_file(str(volume["results"] / "adapter" / "adapter_model.safetensors"))
    for name in ("alice", "bob"):
        records = [json.loads(line) for line in (volume[f"{name}-out"] / "metrics.jsonl").read_text().splitlines()]
        assert sorted({r["round"] for r in records if r["event"] == "step"}) == [0, 1]
        client = load_file(str(volume[f"{name}-out"] / "client_adapter.safetensors"))
        assert set(client) < set(exported)
    assert (volume["model"] / "builtin" / "tiny-gpt2-v1" / "model.safetensors").is_file()  # built once, shared

    # the server's metrics were read by name from another host while it trained
    assert seen, "the metrics endpoint was never reachable from another namespace"
    assert any("splitlora_clients_joined 2.0" in text for text in seen)
    # logs are JSON lines that name client and round
    alice_log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "alice.log").read_text().splitlines()
                 if line.startswith("{")]
    assert any(e.get("client") == "alice" and e.get("round") == 1 for e in alice_log)
    agg_log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "aggregator.log").read_text().splitlines()
               if line.startswith("{")]
    assert [e["round"] for e in agg_log if re.match(r"round \d+ closed", e["message"])] == [0, 1]
    assert time.monotonic() - started < 150


@pytest.mark.skipif(not certs_command_available(), reason="needs issue 4's certs command")
def test_the_docker_compose_demo_trains_and_exports(tmp_path: Path) -> None:
    """docker/docker-compose.yml as it is, with a short schedule through its own variables."""
    env = {"SPLITLORA_ROUNDS": "2", "SPLITLORA_LOCAL_STEPS": "3"}
    project = load_project(ROOT / "docker" / "docker-compose.yml", env)
    with ComposeRun(project, tmp_path / "run", {**_environment(), **env}, timeout=240) as run:
        result = run.wait()
        volume = run.volumes.named
        assert result.ok, f"{result.failure}\n{_explain(run)}"
    assert set(result.exit_codes) == {"certs", "server", "alice", "bob", "carol"}
    assert (volume["results"] / "server" / "adapter" / "adapter_model.safetensors").is_file()
    for name in ("alice", "bob", "carol"):
        assert (volume[f"{name}-out"] / "client_adapter.safetensors").is_file()
    assert {"ca.pem", "server.pem", "admin.pem", "alice.pem"} <= {p.name for p in volume["certs"].iterdir()}
