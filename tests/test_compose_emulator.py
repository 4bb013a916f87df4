"""The compose emulator's reading of compose files and its volume mapping (no namespaces needed), and one small
run that checks health checks, depends_on conditions, failure handling and clean-up (namespaces needed)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from compose_emulator import ComposeError, ComposeRun, load_project, netns_unavailable_reason
from compose_emulator.spec import interpolate, merge, parse_duration
from compose_emulator.volumes import PathMap, Volumes


def _project(tmp_path: Path, text: str, env: dict[str, str] | None = None, name: str = "compose.yml"):
    path = tmp_path / name
    path.write_text(text)
    return load_project(path, env or {})


def test_durations_interpolation_and_merge() -> None:
    assert [parse_duration(v, "t") for v in ("5s", "500ms", "1m30s", 2, "1h")] == [5, 0.5, 90, 2, 3600]
    with pytest.raises(ComposeError, match="not a duration"):
        parse_duration("5 s", "t")
    env = {"A": "1", "EMPTY": ""}
    assert interpolate(["$A", "${A}", "${B:-2}", "${EMPTY:-3}", "${EMPTY-4}", "$$A", {"k": "${B-x}"}], env) == \
        ["1", "1", "2", "3", "", "$A", {"k": "x"}]
    with pytest.raises(ComposeError, match="B is required: give it"):
        interpolate("${B:?give it}", env)
    assert merge({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2]}, "e": 2}) == {"a": {"b": 1, "c": [2]}, "d": 1,
                                                                                   "e": 2}


def test_services_commands_environment_mounts_and_order(tmp_path: Path) -> None:
    project = _project(tmp_path, """
x-common: &common
  environment: [A=1, FROM_HOST, NOT_SET]
services:
  web:
    <<: *common
    entrypoint: [python, -m]
    command: "http.server '8080'"
    volumes: ["./site:/srv:ro", "cache:/var/cache", {type: bind, source: /tmp, target: /scratch}, /anon]
    depends_on: {db: {condition: service_healthy}}
    healthcheck: {test: "curl -f localhost:8080", interval: 2s, retries: 5, start_period: 1m}
  db:
    command: [sleep, "5"]
    healthcheck: {test: [CMD, "true"]}
  migrate:
    command: [sleep, "0"]
    depends_on: [db]
volumes: {cache: {}}
""", env={"FROM_HOST": "h"})
    web = project.services["web"]
    assert web.argv == ["python", "-m", "http.server", "8080"] and web.environment == {"A": "1", "FROM_HOST": "h"}
    assert [(m.kind, m.source, m.target, m.read_only) for m in web.mounts] == [
        ("bind", "./site", "/srv", True), ("volume", "cache", "/var/cache", False),
        ("bind", "/tmp", "/scratch", False), ("volume", "", "/anon", False)]
    assert web.healthcheck.test == ("sh", "-c", "curl -f localhost:8080") and web.healthcheck.start_period == 60
    assert project.services["migrate"].depends_on == {"db": "service_started"}
    order = project.start_order()
    assert order.index("db") < order.index("web") and order.index("db") < order.index("migrate")


@pytest.mark.parametrize("text, message", [
    ("services: {a: {command: [x], depends_on: [b]}}", "unknown service 'b'"),
    ("services: {a: {command: [x], depends_on: {a: {condition: service_done}}}}", "service_done"),
    ("services: {a: {command: [x], volumes: ['data:/d']}}", "not declared"),
    ("services: {a: {command: [x], env_file: .env}}", "env_file cannot be emulated"),
    ("services: {a: {image: x}}", "no command"),
    ("services: {a: {command: [x], depends_on: [b]}, b: {command: [x], depends_on: [a]}}", "dependency cycle"),
])
def test_what_cannot_be_emulated_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ComposeError, match=message):
        _project(tmp_path, text).start_order()


def test_services_of_a_profile_run_only_when_it_is_active(tmp_path: Path) -> None:
    text = ("services: {a: {command: [x]}, b: {command: [y], profiles: [extra], depends_on: [a]},"
            " c: {image: z, profiles: [other]}}")
    (tmp_path / "p.yml").write_text(text)
    assert list(load_project(tmp_path / "p.yml", {}).services) == ["a"]  # c's missing command is never looked at
    assert load_project(tmp_path / "p.yml", {}, profiles=["extra"]).start_order() == ["a", "b"]


def test_paths_are_rewritten_only_where_they_are_whole(tmp_path: Path) -> None:
    paths = PathMap({"/out": tmp_path / "o", "/out/deep": tmp_path / "d", "/data/train.txt": tmp_path / "t.txt"})
    assert paths.rewrite("/out/x") == f"{tmp_path}/o/x" and paths.rewrite("/out/deep/y") == f"{tmp_path}/d/y"
    assert paths.rewrite("--output=/out") == f"--output={tmp_path}/o"
    assert paths.rewrite("cp /data/train.txt /out/") == f"cp {tmp_path}/t.txt {tmp_path}/o/"
    for untouched in ("/output", "/opt/out", "/data/train.txt.bak", "relative/out"):
        assert paths.rewrite(untouched) == untouched
    assert paths.host_path("/out/deep/z") == tmp_path / "d" / "z"


def test_volumes_share_named_copy_writable_binds_and_keep_read_only_ones(tmp_path: Path) -> None:
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "a.txt").write_text("a")
    project = _project(tmp_path, """
services:
  one: {command: [x], volumes: ["shared:/s", "./seed:/seed:ro", "./seed:/work"]}
  two: {command: [x], volumes: ["shared:/t"]}
volumes: {shared: {}}
""")
    volumes = Volumes(project, tmp_path / "run")
    assert volumes.host_path("one", "/s/f") == volumes.host_path("two", "/t/f")
    assert volumes.host_path("one", "/seed/a.txt") == (tmp_path / "seed" / "a.txt").resolve()
    work = volumes.host_path("one", "/work")
    assert (work / "a.txt").read_text() == "a" and tmp_path / "run" in work.parents  # a copy: the source stays clean


_NO_NETNS = netns_unavailable_reason()


@pytest.mark.skipif(_NO_NETNS is not None, reason=f"network namespaces unavailable: {_NO_NETNS}")
def test_a_dependency_that_fails_stops_the_run_and_everything_is_cleaned_up(tmp_path: Path) -> None:
    project = _project(tmp_path, """
services:
  flaky: {command: [sh, -c, "sleep 30"], healthcheck: {test: [CMD, "false"], interval: 0.2s, retries: 2}}
  after: {command: ["true"], depends_on: {flaky: {condition: service_healthy}}}
  lonely: {command: [sh, -c, "sleep 30"]}
""")
    with ComposeRun(project, tmp_path / "run", {"PATH": "/usr/bin:/bin"}, timeout=30) as run:
        result = run.wait(30)
        namespaces = [run.network.namespace(n) for n in run.order] + [run.network.switch]
        pids = [p.pid for p in run.procs.values()]
    assert result.failure == "after cannot start: flaky is unhealthy" and "after" not in result.exit_codes
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces)
    assert not any(Path(f"/etc/netns/{ns}").exists() for ns in namespaces)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
