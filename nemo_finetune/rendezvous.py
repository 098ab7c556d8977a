"""The torch.distributed rendezvous variables of this process's environment, and scoped changes to it."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping

# Set in os.environ by Lightning once a process has joined torch.distributed; a script this process starts must pick
# its own rendezvous.
RENDEZVOUS_VARS = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK"}
)


def environ_without_rendezvous() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block and as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rendezvous_environ(config, environ: Mapping[str, str]) -> dict[str, str]:
    """What NeMo-Run's torchrun launcher reads from this process's environment when it builds a multi-node local
    launch (node rank, node 0's address from SageMaker's SM_HOSTS unless MASTER_ADDR is set, port); set only while
    the launch is built and run (common.scoped_environ)."""
    if config.executor != "local" or config.num_nodes == 1:
        return {}
    values = {"NODE_RANK": str(config.node_rank), "MASTER_PORT": environ.get("MASTER_PORT", "29500")}
    hosts = json.loads(environ["SM_HOSTS"]) if "SM_HOSTS" in environ else None
    if "MASTER_ADDR" not in environ and hosts:
        values["MASTER_ADDR"] = hosts[0]
    return values
