"""What ``benchmarks.compare`` reads from ``/proc`` (Linux): CPU time and memory
of a process tree, and which process holds each end of a server's TCP
connections (``tidings serve --workers``: which worker got which client)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from benchmarks.fanout import CLK_TCK, proc_runtime_seconds

__all__ = ["connection_owners", "proc_tree", "tree_cpu_seconds", "tree_cpu_split", "tree_rss_kib",
           "tree_runtime_seconds"]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as file:
                out.extend(int(c) for c in file.read().split())
    except OSError:
        pass
    return out


def proc_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its descendants, in seconds: its own code
    and the kernel's on its behalf (system calls, wake-ups)."""
    user = system = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its descendants, in seconds."""
    return sum(tree_cpu_split(pid))


def tree_runtime_seconds(pid: int) -> float:
    """Scheduler CPU time (schedstat, ns-exact) of a process and its descendants."""
    return sum(proc_runtime_seconds(p) for p in proc_tree(pid))


def tree_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in KiB of a process and its descendants."""
    rss = anon = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as file:
                for line in file:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
        except OSError:
            continue
    return rss, anon


def _server_side(port: int) -> dict[str, int]:
    """Socket inode -> the client's port, for each established TCP connection
    whose local port is ``port``."""
    out: dict[str, int] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, encoding="ascii") as file:
                lines = file.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "01":  # ESTABLISHED
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                out[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    return out


def connection_owners(pids: Iterable[int], port: int) -> dict[int, int]:
    """Client port -> the pid (of ``pids``) holding the server side of that
    connection to ``port``."""
    inodes = _server_side(port)
    owners: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and (client := inodes.get(link[8:-1])) is not None:
                owners[client] = pid
    return owners
