"""Run a docker-compose project without a container engine: a process and a network namespace per service.

`python -m compose_emulator up -f docker/docker-compose.yml` rehearses a multi-host deployment on one Linux
machine (root needed): separate addresses, real TCP between them, names resolved through hosts files.
"""
from compose_emulator.netns import Network, netns_unavailable_reason
from compose_emulator.runner import ComposeRun, RunResult
from compose_emulator.spec import ComposeError, Project, load_project

__all__ = ["ComposeError", "ComposeRun", "Network", "Project", "RunResult", "load_project",
           "netns_unavailable_reason"]
