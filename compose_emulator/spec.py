"""Read a docker-compose file (plus override files) into the parts an emulation needs.

Supported: `command`/`entrypoint` (list or shell-like string), `environment` (list or mapping), `volumes`
(short syntax `SRC:TARGET[:ro]` and long syntax), `depends_on` (list or mapping with `condition`),
`healthcheck` (`CMD`, `CMD-SHELL`, `NONE`; Go-style durations), `working_dir`, YAML anchors and `x-` keys,
`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?msg}` and `$$` interpolation. Override files merge
like `docker compose -f a.yml -f b.yml`: mappings merge key by key, everything else is replaced.
Image-only keys (`image`, `build`, `ports`, `deploy`, `user`, `restart`, ...) are kept but not emulated.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
UNSUPPORTED_KEYS = ("env_file", "extends", "network_mode", "pid", "ipc", "volumes_from")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class ComposeError(ValueError):
    """A compose file this emulation cannot read or run."""


@dataclass(frozen=True)
class HealthCheck:
    """How to tell that a service is healthy; `test` is an argv (`CMD-SHELL` becomes `sh -c`)."""

    test: tuple[str, ...]
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0


@dataclass(frozen=True)
class Mount:
    """A volume: a named volume (`kind="volume"`) or a host path (`kind="bind"`) at `target`."""

    kind: str
    source: str
    target: str
    read_only: bool = False


@dataclass
class Service:
    """One service: its argv, environment, mounts, dependencies and health check."""

    name: str
    argv: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    depends_on: dict[str, str] = field(default_factory=dict)
    healthcheck: HealthCheck | None = None
    working_dir: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Project:
    """A parsed compose project: services by name, the named volumes, and the directory binds are relative to."""

    services: dict[str, Service]
    volumes: list[str]
    directory: Path
    raw: dict[str, Any]

    def start_order(self) -> list[str]:
        """Services ordered so that every one comes after what it depends on (ComposeError on a cycle)."""
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise ComposeError(f"dependency cycle: {' -> '.join((*path, name))}")
            state[name] = "visiting"
            for dep in self.services[name].depends_on:
                visit(dep, (*path, name))
            state[name] = "done"
            order.append(name)

        for name in self.services:
            visit(name, ())
        return order


def parse_duration(value: Any, what: str) -> float:
    """'1m30s' / '500ms' / 5 -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ComposeError(f"{what}: {value!r} is not a duration like 5s, 500ms or 1m30s")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Substitute `${VAR}`-style variables in every string of a YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        name = name or bare
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op and op.endswith("?") and unset:
            raise ComposeError(f"variable {name} is required: {arg or 'not set'}")
        if op and op.endswith("-") and unset:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


def merge(base: Any, override: Any) -> Any:
    """Compose-style merge: mappings key by key, anything else replaced by the override."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


def _argv(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    raise ComposeError(f"{what}: expected a list or a string, got {value!r}")


def _environment(value: Any, host_env: Mapping[str, str], what: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): ("" if v is None else str(v)) for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for item in map(str, value):
            key, sep, val = item.partition("=")
            if sep:
                out[key] = val
            elif key in host_env:
                out[key] = host_env[key]
        return out
    raise ComposeError(f"{what}: expected a list or a mapping, got {value!r}")


def _mount(value: Any, volumes: list[str], what: str) -> Mount:
    if isinstance(value, dict):
        kind, source, target = value.get("type", "volume"), str(value.get("source", "")), str(value.get("target", ""))
        read_only = bool(value.get("read_only", False))
    else:
        pieces = str(value).split(":")
        if len(pieces) == 1:
            pieces = ["", pieces[0]]  # an anonymous volume
        source, target = pieces[0], pieces[1]
        read_only = len(pieces) > 2 and "ro" in pieces[2].split(",")
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    if not target.startswith("/"):
        raise ComposeError(f"{what}: volume target {target!r} must be an absolute path")
    if kind not in ("volume", "bind"):
        raise ComposeError(f"{what}: volume type {kind!r} is not emulated (volume or bind)")
    if kind == "volume" and source and source not in volumes:
        raise ComposeError(f"{what}: named volume {source!r} is not declared under the top-level volumes:")
    return Mount(kind, source, target, read_only)


def _depends_on(value: Any, names: set[str], what: str) -> dict[str, str]:
    deps = {str(v): "service_started" for v in value} if isinstance(value, list) else {
        str(k): (v or {}).get("condition", "service_started") for k, v in (value or {}).items()}
    for dep, condition in deps.items():
        if dep not in names:
            raise ComposeError(f"{what}: depends on unknown service {dep!r}")
        if condition not in CONDITIONS:
            raise ComposeError(f"{what}: condition {condition!r} of {dep!r} is not one of {', '.join(CONDITIONS)}")
    return deps


def _healthcheck(value: Any, what: str) -> HealthCheck | None:
    if not value or value.get("disable"):
        return None
    test = value.get("test")
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not test or test[0] == "NONE":
        return None
    if test[0] == "CMD":
        argv = tuple(map(str, test[1:]))
    elif test[0] == "CMD-SHELL":
        argv = ("sh", "-c", " ".join(map(str, test[1:])))
    else:
        raise ComposeError(f"{what}: healthcheck test must start with CMD, CMD-SHELL or NONE, got {test[0]!r}")
    return HealthCheck(argv, parse_duration(value.get("interval", "30s"), f"{what}.interval"),
                       parse_duration(value.get("timeout", "30s"), f"{what}.timeout"), int(value.get("retries", 3)),
                       parse_duration(value.get("start_period", "0s"), f"{what}.start_period"))


def load_project(paths: list[Path] | Path, env: Mapping[str, str], profiles: Sequence[str] = ()) -> Project:
    """Read, merge and interpolate compose files; binds are relative to the first file's directory. As in compose,
    a service with `profiles:` is left out unless one of them is among `profiles`."""
    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    raw: dict[str, Any] = {}
    for path in paths:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ComposeError(f"{path}: expected a mapping at the top level")
        raw = merge(raw, data)
    raw = interpolate({k: v for k, v in raw.items() if not str(k).startswith("x-")}, env)
    volumes = list((raw.get("volumes") or {}).keys())
    entries = {name: spec for name, spec in (raw.get("services") or {}).items()
               if not (spec or {}).get("profiles") or set((spec or {})["profiles"]) & set(profiles)}
    if not entries:
        raise ComposeError(f"{paths[0]}: no services")
    services = {}
    for name, spec in entries.items():
        what = f"services.{name}"
        spec = spec or {}
        bad = [k for k in UNSUPPORTED_KEYS if k in spec]
        if bad:
            raise ComposeError(f"{what}: {', '.join(bad)} cannot be emulated")
        argv = _argv(spec.get("entrypoint"), f"{what}.entrypoint") + _argv(spec.get("command"), f"{what}.command")
        if not argv:
            raise ComposeError(f"{what}: no command (the emulation does not know the image's default)")
        services[name] = Service(
            name, argv, _environment(spec.get("environment"), env, f"{what}.environment"),
            [_mount(v, volumes, f"{what}.volumes") for v in spec.get("volumes") or []],
            _depends_on(spec.get("depends_on"), set(entries), f"{what}.depends_on"),
            _healthcheck(spec.get("healthcheck"), f"{what}.healthcheck"), str(spec.get("working_dir") or ""), spec)
    return Project(services, volumes, paths[0].resolve().parent, raw)
