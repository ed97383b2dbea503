"""A local Ray is reachable from this machine only, and its auth token file is private."""

from __future__ import annotations

import os
import re
import stat

import ray

from pipelines.cluster.session import secure_token_file
from tests.sockets import listening_sockets, off_loopback


@ray.remote(num_cpus=0)
class Echo:
    def ping(self) -> str:
        return "pong"


@ray.remote(num_cpus=0)
def square(x: int) -> int:
    return x * x


def test_a_local_ray_listens_on_loopback_only(ray_session):
    """The suite's Ray starts as the commands start theirs (``start_local_ray``); with tasks
    and an actor running, every server of its processes (GCS, raylet, core workers, agents)
    listens on 127.0.0.1."""
    echo = Echo.remote()
    assert ray.get(echo.ping.remote()) == "pong"
    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    sockets = listening_sockets(os.getpid())
    names = {name for *_, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert not off_loopback(sockets), off_loopback(sockets)
    ray.kill(echo)


def token_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / ".ray" / "auth_token"


def test_the_token_file_is_created_private_and_a_readable_one_is_named(
    monkeypatch, tmp_path, capsys
):
    path = token_env(monkeypatch, tmp_path)
    assert secure_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert capsys.readouterr().err == ""

    path.chmod(0o644)  # as Ray itself writes it
    assert secure_token_file() == path
    warning = capsys.readouterr().err
    assert str(path) in warning and "0644" in warning and "chmod 600" in warning
    assert path.read_text() == token  # never replaced


def test_no_token_file_when_the_token_is_not_read_from_one(monkeypatch, tmp_path):
    path = token_env(monkeypatch, tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secure_token_file() is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    assert secure_token_file() is None
    assert not path.exists()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert secure_token_file() == tmp_path / "elsewhere"
    assert stat.S_IMODE((tmp_path / "elsewhere").stat().st_mode) == 0o600
