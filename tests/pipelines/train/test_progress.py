"""The run's console view in a real pseudo-terminal: one bar redrawn in place, with step /
total, loss, img/s and the ETA; plain lines where stderr is not a terminal."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from pipelines.train.progress import PlainLines, console_view

REPO = Path(__file__).resolve().parents[3]

# Three intervals of a 30-step run and a message, drawn by the view a terminal gets.
DRAW = """
import time
from pipelines.train.progress import LiveBar, console_view
view = console_view(30)
assert isinstance(view, LiveBar), type(view)
for step, loss in ((10, 4.25), (20, 3.5), (30, 2.75)):
    view.show({"step": step, "epoch": step / 10, "loss": loss, "lr": 0.1,
               "img_per_s": 123.0, "data_wait_share": 0.25})
    time.sleep(0.15)  # past tqdm's redraw interval
    if step == 10:
        view.show({"message": "[darkmatter] kNN top-1 12.50%"})
view.close()
"""


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_terminal_gets_one_live_bar_redrawn_in_place():
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, cols
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", DRAW],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
        )
        os.close(terminal)
        screen = read_all(controller).decode()
        assert child.wait(timeout=60) == 0, screen
    finally:
        os.close(controller)
    # tqdm redraws its one line with carriage returns: never a new line per interval.
    draws = [d for d in screen.split("\r") if "step" in d and "|" in d]
    assert len(draws) >= 3, repr(screen)
    assert "\r[darkmatter] kNN top-1 12.50%\r\n" in screen  # a message: its own line, above
    last = draws[-1]
    assert "30/30" in last and "loss 2.7500" in last and "123 img/s" in last, repr(last)
    assert "wait 25%" in last
    middle = next(d for d in draws if "20/30" in d)
    assert "loss 3.5000" in middle and re.search(r"\d\d:\d\d<\d\d:\d\d", middle), middle  # ETA
    assert len([line for line in screen.split("\n") if "loss" in line]) <= 2, repr(screen)


def test_a_pipe_gets_plain_lines_with_an_eta(capsys):
    view = console_view(30)  # stderr is pytest's capture, not a terminal
    assert isinstance(view, PlainLines)
    for step in (10, 20):
        view.show({"line": f"[darkmatter] step {step}/30  loss 1.0", "step": step})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[darkmatter] step 10/30  loss 1.0"
    assert re.fullmatch(r"\[darkmatter\] step 20/30  loss 1\.0  ETA \d+:\d\d", lines[1])
