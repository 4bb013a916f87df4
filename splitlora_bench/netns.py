"""Rate-limited links for real: one network namespace for the server, one per client, a veth pair between each
client and the server, and a `tc tbf` rate limit on both ends (each direction). Nothing outside the namespaces
created here is touched; deleting the namespaces removes the veth pairs with them. Built with the namespace
primitives of `compose_emulator.netns`."""
from __future__ import annotations

import os
from typing import Sequence

from compose_emulator.netns import delete, exec_prefix, ip, netns_unavailable_reason, run

PREFIX = "slb"


def netns_unavailable() -> str:
    """Why namespaces with rate limits cannot be made here ("" if they can)."""
    return netns_unavailable_reason(("ip", "tc")) or ""


def own_tag() -> str:
    """The prefix of every namespace and device this process creates."""
    return f"{PREFIX}{os.getpid() % 100000}"


class Links:
    """Server and client namespaces joined by veth pairs limited to `rate_mbit` each way (None: no limit)."""

    def __init__(self, clients: int, rate_mbit: float | None) -> None:
        tag = own_tag()
        self.server_ns, self.rate_mbit = f"{tag}s", rate_mbit
        self.client_ns = [f"{tag}c{i}" for i in range(clients)]
        self._veth = [(f"{tag}v{i}a", f"{tag}v{i}b") for i in range(clients)]

    def server_address(self, client: int) -> str:
        """The server's address as client `client` reaches it."""
        return f"10.234.{client}.1"

    def prefix(self, ns: str) -> list[str]:
        """Command prefix that runs a program inside namespace `ns`."""
        return exec_prefix(ns)

    def __enter__(self) -> "Links":
        try:
            for ns in (self.server_ns, *self.client_ns):
                ip("netns", "add", ns)
                ip("-n", ns, "link", "set", "lo", "up")
            for i, (ns, (a, b)) in enumerate(zip(self.client_ns, self._veth)):
                ip("-n", self.server_ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
                for where, dev, host in ((self.server_ns, a, 1), (ns, b, 2)):
                    ip("-n", where, "addr", "add", f"10.234.{i}.{host}/24", "dev", dev)
                    ip("-n", where, "link", "set", dev, "up")
                    if self.rate_mbit:
                        self._limit(where, dev)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _limit(self, ns: str, dev: str) -> None:
        burst = max(32 * 1024, int(self.rate_mbit * 1e6 / 8 / 100))  # at least 10 ms of traffic
        run([*self.prefix(ns), "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.rate_mbit}mbit",
             "burst", str(burst), "latency", "50ms"])

    def __exit__(self, *exc: object) -> None:
        delete([self.server_ns, *self.client_ns])


def namespaces() -> Sequence[str]:
    """Namespaces this process created that exist now (for checks)."""
    out = ip("netns", "list", check=False).stdout.split()
    return [ns for ns in out if ns.startswith(own_tag())]
