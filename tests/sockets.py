"""The listening TCP sockets of a process and all its descendants, read from /proc (Linux):
what a local Ray exposes to the network."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

TCP_LISTEN = "0A"
LOOPBACK = ("127.", "::1", "::ffff:127.")


def process_tree(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    tree = {root}
    while grown := {pid for pid, ppid in parents.items() if ppid in tree} - tree:
        tree |= grown
    return tree


def socket_owners(pids: set[int]) -> dict[int, int]:
    """Socket inode -> pid, for the sockets these processes hold open."""
    owners = {}
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[int(target[8:-1])] = pid
    return owners


def ip_address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)  # /proc/net/tcp*: 32-bit words in host (little-endian) order
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *struct.unpack("<4I", raw)))


def listening_sockets(root: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket in ``root``'s tree."""
    owners = socket_owners(process_tree(root))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[9]) in owners:
                pid = owners[int(fields[9])]
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                address, port = fields[1].split(":")
                found.append((ip_address(address), int(port, 16), name))
    return found


def off_loopback(sockets: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    return [s for s in sockets if not s[0].startswith(LOOPBACK)]
