"""The listening TCP sockets of an embedded local Ray, off loopback and in all: a plain
``ray.init(address="local")`` (the baseline) beside ``start_local_ray`` (what every
command starts), each with an actor and tasks running. Each in a process of its own.

    .venv/bin/python benchmarks/local_listeners.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import json, os, sys
import ray
from tests.sockets import listening_sockets, off_loopback
options = dict(num_cpus=4, include_dashboard=False, log_to_driver=False)
if sys.argv[1] == "ray.init":
    ray.init(address="local", **options)
else:
    from pipelines.cluster.session import start_local_ray
    start_local_ray(**options)

@ray.remote(num_cpus=0)
class Echo:
    def ping(self):
        return 1

@ray.remote
def square(x):
    return x * x

echo = Echo.remote()
ray.get([echo.ping.remote(), *[square.remote(i) for i in range(4)]])
sockets = listening_sockets(os.getpid())
outside = off_loopback(sockets)
print(json.dumps({"all": len(sockets), "off_loopback": len(outside),
                  "processes": sorted({name for *_, name in outside})}))
"""


def measure(how: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, how],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    print(f"{'local Ray':<22}{'listening':>10}{'off loopback':>14}  processes off loopback")
    for how in ("ray.init", "start_local_ray"):
        found = measure(how)
        processes = ", ".join(found["processes"]) or "-"
        print(f"{how:<22}{found['all']:>10}{found['off_loopback']:>14}  {processes}")


if __name__ == "__main__":
    main()
