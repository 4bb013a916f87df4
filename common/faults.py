"""A testing hook: a process kills itself (SIGKILL) at a named point of its work.

Set `SPLITLORA_FAULT` to comma-separated `role:point=value` entries, e.g. `SPLITLORA_FAULT=server:step=5`; the
process that reaches `fault_point("server", "step", 5)` dies on the spot, as if the machine lost power. The fault
tests use it to hit exact places (mid-step, between steps, during aggregation, in the middle of a checkpoint
write). It is for tests only: leave the variable unset in deployments. The points:

- server: `step=N` inside the N-th step this process computes (after backward, before the optimizer update);
  `reply=N` after the N-th step reply was handed to gRPC; `round-end=R` after round R's server adapters
  were averaged, before its checkpoint; `checkpoint=R` between the two files of the checkpoint written when
  round R closes.
- aggregator: `submit=N` after the N-th accepted submission was stored, before the reply; `close=R` during the
  FedAvg of round R, before its global adapter is written.
- client: `step=N` in client step N, after the server's answer and before the client's update;
  `submit=R` after the adapter of round R was submitted, before the global one is fetched.
"""
from __future__ import annotations

import logging
import os
import signal

ENV = "SPLITLORA_FAULT"
log = logging.getLogger(__name__)


def fault_point(role: str, point: str, value: int) -> None:
    """SIGKILL this process if `SPLITLORA_FAULT` names `role:point=value`; otherwise do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if f"{role}:{point}={value}" in {entry.strip() for entry in spec.split(",")}:
        log.warning("%s=%s: killing this process at %s:%s=%d", ENV, spec, role, point, value)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
