"""`docker compose config`-style checks of docker/: every command parses with the CLI's own parser, the
services agree with each other (ports, names, LoRA settings, certificates), and the images are pinned,
non-root and health-checked."""
from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from compose_emulator import load_project
from tests.support.compose import certs_command_available, parse_errors, uses_tls_flags, without_tls_flags

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
PROJECT = load_project(DOCKER / "docker-compose.yml", {})
GPU_PROJECT = load_project([DOCKER / "docker-compose.yml", DOCKER / "docker-compose.gpu.yml"], {})
CLIENTS = ("alice", "bob", "carol")


def _commands() -> list[tuple[str, list[str]]]:
    """(label, argv) of every service command and health check, in both the plain and the GPU project."""
    out = []
    for tag, project in (("", PROJECT), ("gpu:", GPU_PROJECT)):
        for name, service in project.services.items():
            out.append((f"{tag}{name}", service.argv))
            if service.healthcheck is not None:
                out.append((f"{tag}{name}.healthcheck", list(service.healthcheck.test)))
    return out


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("label, argv", _commands(), ids=[label for label, _ in _commands()])
def test_every_command_parses_with_the_cli_parser(label: str, argv: list[str]) -> None:
    if uses_tls_flags(argv) and not certs_command_available():
        pytest.skip("needs issue 4's certs command and TLS flags")
    assert parse_errors(argv) == "", f"{label}: {' '.join(argv)}"


@pytest.mark.parametrize("name", [n for n in PROJECT.services if n != "certs"])
def test_every_command_parses_without_the_tls_flags_already(name: str) -> None:
    """Until issue 4 lands: everything but the TLS flags is checked now."""
    argv = without_tls_flags(PROJECT.services[name].argv)
    assert parse_errors(argv) == "", " ".join(argv)


def test_the_services_agree_with_each_other() -> None:
    services = PROJECT.services
    assert PROJECT.start_order()[0] == "certs" and set(services) == {"certs", "server", *CLIENTS}
    server = services["server"].argv
    port = _flag(server, "--port")
    assert services["server"].depends_on == {"certs": "service_completed_successfully"}
    assert f"localhost:{port}" in services["server"].healthcheck.test
    assert int(_flag(server, "--clients")) == len(CLIENTS)
    certs = services["certs"].argv
    assert "server" in _flag(certs, "--server-names").split(",")
    assert _flag(certs, "--clients").split(",") == list(CLIENTS)
    lora = [a for a in server if a.startswith("--lora")]
    assert lora  # the server plans them
    for name in CLIENTS:
        client = services[name]
        argv = client.argv
        assert client.depends_on == {"server": "service_healthy"}
        assert _flag(argv, "--server") == f"server:{port}" and _flag(argv, "--client-id") == name
        assert _flag(argv, "--tls-cert") == f"/certs/{name}.pem" and _flag(argv, "--tls-key") == f"/certs/{name}.key"
        for flag in [*lora, "--split-layer"]:  # taken from the server's plan: a client gives none of them
            assert flag not in argv, (name, flag)
        shard = next(m for m in client.mounts if m.target == _flag(argv, "--data"))
        assert shard.kind == "bind" and shard.read_only and (DOCKER / shard.source).is_file()
        assert shard.source.endswith(f"{name}.txt")
        assert client.environment["SPLITLORA_HOME"] == services["server"].environment["SPLITLORA_HOME"]
    for name, service in services.items():
        if "--tls-ca" in service.argv:
            assert any(m.source == "certs" and (m.read_only or name == "certs") for m in service.mounts), name


def test_gpu_override_reserves_a_gpu_and_changes_no_command() -> None:
    server = GPU_PROJECT.services["server"]
    devices = server.raw["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert server.argv == PROJECT.services["server"].argv and _flag(server.argv, "--device") == "auto"
    assert {n: s.argv for n, s in GPU_PROJECT.services.items()} == {n: s.argv for n, s in PROJECT.services.items()}


def test_schedule_variables_interpolate() -> None:
    short = load_project(DOCKER / "docker-compose.yml", {"SPLITLORA_ROUNDS": "2", "SPLITLORA_LOCAL_STEPS": "3"})
    argv = short.services["server"].argv
    assert (_flag(argv, "--rounds"), _flag(argv, "--local-steps")) == ("2", "3")
    default = PROJECT.services["server"].argv
    assert (_flag(default, "--rounds"), _flag(default, "--local-steps")) == ("5", "30")


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


@pytest.mark.parametrize("name", ["server.Dockerfile", "client.Dockerfile"])
def test_images_are_pinned_non_root_and_health_checked(name: str) -> None:
    text = _dockerfile(name)
    bases = re.findall(r"^ARG (?:CUDA|PYTHON)_IMAGE=(\S+)$", text, flags=re.M)
    assert bases and all(re.search(r":\d+\.\d+(\.\d+)?-", b) for b in bases), bases  # an exact version tag
    assert "latest" not in text and re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, flags=re.M)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert "--constraint /tmp/constraints.txt" in text and "HEALTHCHECK" in text
    assert text.count("FROM ") == 2  # build stage + runtime stage: no compilers or caches in the image


def test_client_image_is_cpu_only_and_its_healthcheck_parses() -> None:
    text = _dockerfile("client.Dockerfile")
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text and "cuda" not in text.lower()
    argv = json.loads(re.search(r"CMD (\[.*\])\s*$", text.split("HEALTHCHECK", 1)[1].split("\nCMD")[0]).group(1))
    assert parse_errors(argv) == ""
    server = _dockerfile("server.Dockerfile")
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", server, flags=re.M)
    assert "python -m splitlora_server.healthcheck --server" in server


def test_constraints_pin_every_dependency() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", d)[0].lower().replace("_", "-") for d in deps} - {"torch"}
    pinned = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            pinned[pkg.lower().replace("_", "-")] = version
    assert names <= set(pinned) and all(re.fullmatch(r"\d+(\.\d+)+", v) for v in pinned.values())


def test_demo_data_matches_its_generator(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in module.write(tmp_path):
        assert path.read_bytes() == (DOCKER / "data" / path.name).read_bytes(), "run scripts/make_demo_data.py"


def _binds(service: dict) -> dict[str, Path]:
    """target -> host path of a service's relative bind mounts."""
    pieces = [v.split(":") for v in service["volumes"]]
    return {p[1]: DOCKER / p[0] for p in pieces if p[0].startswith(".")}


def test_monitoring_profile_scrapes_the_server_and_provisions_the_dashboard() -> None:
    raw = PROJECT.raw["services"]
    monitoring = {n for n, s in raw.items() if s.get("profiles")}
    assert monitoring == {"prometheus", "grafana"} and all(raw[n]["profiles"] == ["monitoring"] for n in monitoring)
    assert not monitoring & set(PROJECT.services)  # a plain `up` leaves them out
    prometheus, grafana = raw["prometheus"], raw["grafana"]
    assert all(re.search(r":v?\d+\.\d+\.\d+$", s["image"]) for s in (prometheus, grafana))  # pinned
    config_path = "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(_binds(prometheus)[config_path].read_text())
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"server:{_flag(PROJECT.services['server'].argv, '--metrics-port')}"]
    assert f"--config.file={config_path}" in prometheus["command"]
    binds = _binds(grafana)
    provisioning = binds["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "splitlora.yml").read_text())["providers"][0]
    dashboards = [t for t in binds if t.startswith(provider["options"]["path"] + "/") and t.endswith(".json")]
    assert [binds[t].name for t in dashboards] == ["splitlora-dashboard.json"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboards[0]


def _exported_metric_names() -> set[str]:
    """Sample names the split server's and the aggregator's collectors expose (counters get `_total`)."""
    from splitlora_server.aggregator.service import AggregatorService
    from splitlora_server.ops.metrics import AggregatorCollector, SplitServerCollector
    from splitlora_server.registry import Registry
    from splitlora_server.rounds.coordinator import RoundCoordinator
    from splitlora_server.rounds.gate import Quorum

    registry = Registry(3, 5, RoundCoordinator(2, Quorum(3)))
    families = [*SplitServerCollector(registry).collect(), *AggregatorCollector(
        AggregatorService(3, 2, None)).collect()]
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


def test_dashboard_queries_only_metrics_the_roles_export() -> None:
    dashboard = json.loads((DOCKER / "monitoring" / "splitlora-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bsplitlora_\w+", e)}
    exported = _exported_metric_names()
    assert used <= exported, used - exported
    # steps/s, loss, per-client bytes and errors, round progress: each has a panel
    for name in ("splitlora_client_steps_total", "splitlora_client_loss", "splitlora_client_received_bytes_total",
                 "splitlora_client_sent_bytes_total", "splitlora_client_errors_total", "splitlora_round_current"):
        assert name in used, name
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "splitlora"
