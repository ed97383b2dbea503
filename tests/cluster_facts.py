"""Run a test module as a script in a fresh Python, with its own `ray.cluster_utils.Cluster`
(token auth, no usage stats, away from the session Ray), and read back the facts it wrote."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def facts_from_script(script: str, prefix: str, timeout: int) -> dict[str, Any]:
    """``python script TMP`` must write ``TMP/facts.json``; its content, or a failed assert
    with the script's output."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
        # Cluster.add_node writes the head's address to RAY_TMPDIR/ray/ray_current_cluster,
        # not under the head's temp_dir: on a fresh machine /tmp/ray does not exist yet.
        "RAY_TMPDIR": str(tmp),
    }
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, script, str(tmp)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        facts_file = tmp / "facts.json"
        assert done.returncode == 0 and facts_file.exists(), (
            done.stdout[-3000:] + done.stderr[-5000:]
        )
        return json.loads(facts_file.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(num_cpus: int, **extra: Any) -> dict[str, Any]:
    """``Cluster.add_node`` arguments: ``num_cpus`` and ports of its own (other Ray
    clusters may share this machine)."""
    return {
        "num_cpus": num_cpus,
        "dashboard_agent_listen_port": free_port(),
        "runtime_env_agent_port": free_port(),
        "metrics_export_port": free_port(),
        **extra,
    }
