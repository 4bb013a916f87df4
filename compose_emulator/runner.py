"""Run a compose project without a container engine: one process and one network namespace per service.

Services start in dependency order once their `depends_on` conditions hold (`service_started`,
`service_healthy`, `service_completed_successfully`); health checks run inside the service's namespace on
their interval, with the same environment and volume mapping; logs go to `<root>/logs/<service>.log`.
Like `docker compose up --abort-on-container-exit`-with-failures: the run stops when every service has
exited, or at the first failure (a non-zero exit, an unhealthy dependency, the deadline).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from compose_emulator.netns import DEFAULT_SUBNET, Network
from compose_emulator.spec import Project, Service
from compose_emulator.volumes import Volumes

POLL_S = 0.1
STOP_GRACE_S = 5.0


@dataclass
class _Health:
    """Health-check bookkeeping of one service."""

    state: str = "starting"  # starting, healthy, unhealthy
    failures: int = 0
    next_check: float = 0.0
    probe: subprocess.Popen | None = None
    probe_deadline: float = 0.0


@dataclass
class RunResult:
    """How a run ended: exit codes of the services that ran, and the first failure (empty if none)."""

    exit_codes: dict[str, int] = field(default_factory=dict)
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure


class ComposeRun:
    """A compose project brought up in network namespaces under `root`; use as a context manager."""

    def __init__(self, project: Project, root: Path, base_env: Mapping[str, str], subnet: str = DEFAULT_SUBNET,
                 timeout: float = 600.0) -> None:
        self.project, self.root, self.timeout = project, Path(root), timeout
        self.base_env = dict(base_env)
        self.order = project.start_order()
        self.network = Network(list(project.services), subnet)
        self.volumes = Volumes(project, self.root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.health = {name: _Health() for name in project.services}
        self.started_at: dict[str, float] = {}
        self.result = RunResult()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- what a service sees ---------------------------------------------------------------------------------
    def environment(self, name: str) -> dict[str, str]:
        """Base environment plus the service's own, with container paths mapped."""
        own = {k: self.volumes.rewrite(name, v) for k, v in self.project.services[name].environment.items()}
        return {**self.base_env, **own}

    def argv(self, name: str, argv: list[str] | tuple[str, ...] | None = None) -> list[str]:
        """The service's command (or `argv`) with container paths mapped."""
        return [self.volumes.rewrite(name, a) for a in (argv if argv is not None else self.project.services[name].argv)]

    def workdir(self, name: str) -> Path:
        """The service's working directory: its `working_dir` mapped, else a private empty directory."""
        service: Service = self.project.services[name]
        path = Path(self.volumes.rewrite(name, service.working_dir)) if service.working_dir else \
            self.root / "cwd" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def address(self, name: str) -> str:
        """The service's IP address on the private network."""
        return self.network.addresses[name]

    def host_path(self, service: str, container_path: str) -> Path:
        """Where a path inside a service's container lives on this machine."""
        return self.volumes.host_path(service, container_path)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> "ComposeRun":
        self.network.create()
        self._thread = threading.Thread(target=self._loop, name="compose-emulator", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the run ends (or `timeout`); the result so far."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def wait_healthy(self, name: str, timeout: float) -> bool:
        """Block until `name` is healthy; False on timeout or if the run ended first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.health[name].state != "healthy":
                left = deadline - time.monotonic()
                if left <= 0 or self._finished():
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def exec(self, name: str, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a command in a service's namespace with its environment and volumes (like `docker compose exec`)."""
        return subprocess.run(self.network.wrap(name, self.argv(name, argv)), env=self.environment(name),
                              cwd=self.workdir(name), capture_output=True, text=True, timeout=timeout)

    def down(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), then remove the namespaces."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S * 3)
        self._terminate_all()
        problems = self.network.destroy()
        if problems:
            raise RuntimeError("could not remove namespaces: " + "; ".join(problems))

    # -- the scheduler ---------------------------------------------------------------------------------------
    def _finished(self) -> bool:
        return bool(self.result.failure) or (len(self.result.exit_codes) == len(self.order))

    def _fail(self, message: str) -> None:
        if not self.result.failure:
            self.result.failure = message

    def _loop(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while not self._stop.is_set() and not self._finished():
                if time.monotonic() > deadline:
                    self._fail(f"timed out after {self.timeout:.0f} s; still running: "
                               f"{', '.join(n for n in self.procs if n not in self.result.exit_codes)}")
                    break
                self._reap()
                self._check_health()
                self._start_ready()
                with self._changed:
                    self._changed.notify_all()
                time.sleep(POLL_S)
        except Exception as err:  # report, never leave a half-started run behind silently
            self._fail(f"emulator error: {err!r}")
        finally:
            self._terminate_all()
            with self._changed:
                self._changed.notify_all()

    def _start_ready(self) -> None:
        for name in self.order:
            if name in self.procs:
                continue
            verdicts = [self._condition(dep, cond) for dep, cond in self.project.services[name].depends_on.items()]
            blocked = [v for v in verdicts if v not in (True, False)]
            if blocked:
                self._fail(f"{name} cannot start: {blocked[0]}")
                return
            if all(verdicts):
                self._start(name)

    def _condition(self, dep: str, condition: str) -> bool | str:
        """True if met, False if not yet, a reason string if it never will be."""
        code = self.result.exit_codes.get(dep)
        if condition == "service_started":
            return dep in self.procs
        if condition == "service_completed_successfully":
            if code is None:
                return False
            return True if code == 0 else f"{dep} exited with code {code}"
        state = self.health[dep].state
        if self.project.services[dep].healthcheck is None:
            return f"{dep} has no healthcheck, so it can never be healthy"
        if state == "unhealthy":
            return f"{dep} is unhealthy"
        if code is not None and state != "healthy":
            return f"{dep} exited with code {code} before it was healthy"
        return state == "healthy"

    def _start(self, name: str) -> None:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        try:
            self.procs[name] = subprocess.Popen(self.network.wrap(name, self.argv(name)), env=self.environment(name),
                                                cwd=self.workdir(name), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        now = time.monotonic()
        self.started_at[name] = now
        check = self.project.services[name].healthcheck
        if check is not None:
            self.health[name].next_check = now + check.interval

    def _reap(self) -> None:
        for name, proc in self.procs.items():
            if name in self.result.exit_codes or proc.poll() is None:
                continue
            self.result.exit_codes[name] = proc.returncode
            if proc.returncode != 0:
                self._fail(f"{name} exited with code {proc.returncode}; see {self.root / 'logs' / (name + '.log')}")

    def _check_health(self) -> None:
        now = time.monotonic()
        for name, proc in self.procs.items():
            check, health = self.project.services[name].healthcheck, self.health[name]
            if check is None or name in self.result.exit_codes or health.state == "unhealthy":
                continue
            if health.probe is not None:
                code = health.probe.poll()
                if code is None and now < health.probe_deadline:
                    continue
                if code is None:
                    _kill_group(health.probe, signal.SIGKILL)
                    health.probe.wait()
                health.probe = None
                self._record_probe(name, code == 0, now)
            elif now >= health.next_check:
                health.probe = subprocess.Popen(self.network.wrap(name, self.argv(name, list(check.test))),
                                                env=self.environment(name), cwd=self.workdir(name),
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
                health.probe_deadline = now + check.timeout

    def _record_probe(self, name: str, passed: bool, now: float) -> None:
        check, health = self.project.services[name].healthcheck, self.health[name]
        health.next_check = now + check.interval
        if passed:
            health.state, health.failures = "healthy", 0
            return
        if now - self.started_at[name] < check.start_period:
            return  # failures in the start period do not count
        health.failures += 1
        if health.failures >= check.retries:
            health.state = "unhealthy"

    def _terminate_all(self) -> None:
        procs = [p for p in self.procs.values() if p.poll() is None]
        procs += [h.probe for h in self.health.values() if h.probe is not None and h.probe.poll() is None]
        for proc in procs:
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group this emulator started for `proc` (its own session)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
