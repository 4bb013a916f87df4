"""A private network of Linux network namespaces: one per service, joined by a bridge, names in hosts files.

The bridge lives in a namespace of its own (the "switch"), so nothing is added to the host's network: each
service namespace gets `eth0` (its address on a private /24) and `lo`; the other end of its veth pair sits on
the switch's bridge. `ip netns exec` bind-mounts `/etc/netns/<namespace>/hosts` over `/etc/hosts`, so every
service resolves every other service's name. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2.

The primitives (`ip`, `exec_prefix`, `delete`, `netns_unavailable_reason`) are the one namespace helper of the
tree: the benchmarks' rate-limited links (`splitlora_bench/netns.py`) are built with them too.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
DEFAULT_SUBNET = "10.231.0.0/24"


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a network command; RuntimeError with its error output when it fails (and `check`)."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS` (iproute2)."""
    return run(["ip", *args], check)


def exec_prefix(ns: str) -> list[str]:
    """The argv prefix that runs a program inside namespace `ns`."""
    return ["ip", "netns", "exec", ns]


def delete(namespaces: list[str]) -> list[str]:
    """Delete namespaces (their veth ends go with them); return what could not be removed."""
    problems = []
    for ns in namespaces:
        result = ip("netns", "del", ns, check=False)
        if result.returncode:
            problems.append(f"{ns}: {result.stderr.strip()}")
    return problems


def netns_unavailable_reason(commands: tuple[str, ...] = ("ip",)) -> str | None:
    """None if namespaces can be created here (and `commands` exist), else why not (for a pytest skip)."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        return f"needs the {', '.join(missing)} command(s) (iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"slc-probe-{secrets.token_hex(3)}"
    try:
        made = ip("netns", "add", probe, check=False)
        if made.returncode:
            return f"ip netns add failed: {made.stderr.strip()}"
        ran = run([*exec_prefix(probe), "ip", "link", "set", "lo", "up"], check=False)
        if ran.returncode:
            return f"ip netns exec failed: {ran.stderr.strip()}"
        return None
    finally:
        delete([probe])


class Network:
    """Namespaces `<prefix>-<service>` and `<prefix>-switch`, created by `create()` and removed by `destroy()`."""

    def __init__(self, services: list[str], subnet: str = DEFAULT_SUBNET, prefix: str | None = None) -> None:
        self.prefix = prefix or f"slc{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-switch"
        net = ipaddress.ip_network(subnet)
        hosts = list(net.hosts())
        if len(services) + 1 > len(hosts):
            raise ValueError(f"subnet {subnet} is too small for {len(services)} services")
        self.prefixlen = net.prefixlen
        self.addresses = {name: str(hosts[i + 1]) for i, name in enumerate(services)}  # .1 is left free
        self.created: list[str] = []

    def namespace(self, service: str) -> str:
        """The namespace a service runs in."""
        return f"{self.prefix}-{service}"

    def hosts_text(self) -> str:
        """The /etc/hosts every service sees."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{address} {name}" for name, address in self.addresses.items()]
        return "\n".join(lines) + "\n"

    def create(self) -> None:
        """Create the switch, one namespace per service, the veth pairs, addresses and hosts files."""
        ip("netns", "add", self.switch)
        self.created.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for index, (name, address) in enumerate(self.addresses.items()):
            ns, port = self.namespace(name), f"p{index}"
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch)
            ip("-n", self.switch, "link", "set", port, "master", "br0")
            ip("-n", self.switch, "link", "set", port, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{address}/{self.prefixlen}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.hosts_text(), encoding="utf-8")

    def wrap(self, service: str, argv: list[str]) -> list[str]:
        """The argv that runs `argv` inside the service's namespace."""
        return [*exec_prefix(self.namespace(service)), *argv]

    def destroy(self) -> list[str]:
        """Delete every namespace and hosts file this network created; return what could not be removed."""
        problems = delete(list(reversed(self.created)))
        for ns in self.created:
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self.created.clear()
        return problems
