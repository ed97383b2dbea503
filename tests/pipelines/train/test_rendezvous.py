"""The rendezvous store of a loopback MASTER_ADDR listens on loopback only (torch's own one
listens on every interface); the process group it starts works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cluster_facts import free_port
from tests.sockets import off_loopback

REPO = Path(__file__).resolve().parents[3]

# One rank's process group through env://, as Ray Train starts it, with and without ours.
GROUP = """
import json, os, sys
import torch, torch.distributed as dist
from pipelines.train.rendezvous import serve_stores_on_loopback
from tests.sockets import listening_sockets
if sys.argv[1] == "ours":
    serve_stores_on_loopback()
dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
total = torch.ones(3)
dist.all_reduce(total)
sockets = listening_sockets(os.getpid())
dist.destroy_process_group()
print(json.dumps({"sum": total.sum().item(), "sockets": sockets}))
"""


def rendezvous_sockets(which: str) -> dict:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", GROUP, which],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_store_of_a_loopback_master_listens_on_loopback_only():
    ours = rendezvous_sockets("ours")
    assert ours["sum"] == 3.0
    assert ours["sockets"], "the store listens somewhere"
    assert not off_loopback(ours["sockets"]), ours["sockets"]
    torchs = rendezvous_sockets("torch")  # what it replaces: the store on every interface
    assert off_loopback(torchs["sockets"]), torchs
