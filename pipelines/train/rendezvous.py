"""The workers' rendezvous on a loopback-only local Ray: torch.distributed's store, which
rank 0 serves at MASTER_ADDR:MASTER_PORT, listens on 127.0.0.1 as well.

torch's ``TCPStore`` server binds every interface whatever its host name; given an already
bound socket (``master_listen_fd``) it listens there instead. Ray Train sets MASTER_ADDR to
rank 0's node address, 127.0.0.1 in an embedded Ray (``pipelines.cluster.session``), so a
store whose host is a loopback address is served on a socket bound to it. Any other host
(a cluster) keeps torch's own store.
"""

from __future__ import annotations

import importlib
import ipaddress
import socket
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_stores_on_loopback() -> None:
    """In a Ray Train worker, before its process group starts: rank 0's store for a loopback
    MASTER_ADDR listens on that address only."""
    from torch.distributed import TCPStore

    # By name: ``torch.distributed.rendezvous`` is also a function that hides the module.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")

    torch_store = rendezvous._create_c10d_store
    if getattr(torch_store, "loopback", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or not is_loopback(hostname):
            return torch_store(hostname, port, rank, world_size, timeout, use_libuv)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(socket.SOMAXCONN)
        return TCPStore(
            host_name=hostname,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=listener.detach(),
            use_libuv=use_libuv,
        )

    create_store.loopback = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_store


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(serve_stores_on_loopback)
        super().on_start(worker_group, backend_config)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig`` whose rank 0 serves its store on loopback when its node
    address is loopback (see the module's docstring)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
