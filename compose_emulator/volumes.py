"""Volumes as host directories, and the rewriting of container paths to them.

Without a container engine there is no mount namespace per service: each mount target (e.g. `/certs`) is
mapped to a host directory and every occurrence of the target path in a service's argv, environment,
working directory and health check is rewritten to it. Named volumes become directories shared by the
services that mount them; read-only binds are used in place; writable binds are copied into the run's
directory first, so an emulation never writes into the project.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from compose_emulator.spec import Mount, Project, Service

_PATH_CHAR = r"[\w.~/-]"


class PathMap:
    """Container path prefixes -> host paths, longest prefix first."""

    def __init__(self, pairs: dict[str, Path]) -> None:
        self.pairs = sorted(((t.rstrip("/") or "/", Path(h)) for t, h in pairs.items()), key=lambda p: -len(p[0]))
        self._patterns = [(re.compile(rf"(?<!{_PATH_CHAR}){re.escape(t)}(?=/|$|[^\w.~/-])"), str(h))
                          for t, h in self.pairs]

    def rewrite(self, text: str) -> str:
        """Replace every container path in `text` (a whole argument, `--flag=/path` or a shell line)."""
        for pattern, host in self._patterns:
            text = pattern.sub(lambda _m, host=host: host, text)
        return text

    def host_path(self, container_path: str) -> Path:
        """The host path of a container path (ValueError if no mount covers it)."""
        for target, host in self.pairs:
            if container_path == target or container_path.startswith(target + "/"):
                return host / container_path[len(target):].lstrip("/")
        raise ValueError(f"{container_path} is not under any volume")


class Volumes:
    """Host directories for every mount of a project, under `root`."""

    def __init__(self, project: Project, root: Path) -> None:
        self.project, self.root = project, Path(root)
        self.named = {name: self.root / "volumes" / name for name in project.volumes}
        for path in self.named.values():
            path.mkdir(parents=True, exist_ok=True)
        self.maps = {name: PathMap(self._mounts(service)) for name, service in project.services.items()}

    def _mounts(self, service: Service) -> dict[str, Path]:
        pairs: dict[str, Path] = {}
        for index, mount in enumerate(service.mounts):
            pairs[mount.target] = self._host_dir(service.name, index, mount)
        return pairs

    def _host_dir(self, service: str, index: int, mount: Mount) -> Path:
        if mount.kind == "volume":
            if mount.source:
                return self.named[mount.source]
            path = self.root / "volumes" / f"anonymous-{service}-{index}"
            path.mkdir(parents=True, exist_ok=True)
            return path
        source = Path(mount.source).expanduser()
        source = source if source.is_absolute() else (self.project.directory / source)
        if mount.read_only:
            if not source.exists():
                raise FileNotFoundError(f"services.{service}: read-only bind source {source} does not exist")
            return source.resolve()
        copy = self.root / "binds" / service / mount.target.strip("/").replace("/", "_")
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, copy)
        else:
            copy.mkdir(exist_ok=True)  # docker creates a missing bind source as a directory
        return copy

    def rewrite(self, service: str, text: str) -> str:
        """`text` with the service's container paths replaced by host paths."""
        return self.maps[service].rewrite(text)

    def host_path(self, service: str, container_path: str) -> Path:
        """Where a path inside a service's container lives on the host."""
        return self.maps[service].host_path(container_path)
