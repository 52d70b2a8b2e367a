"""Host memory a stage may use: psutil's available memory, capped by the memory limit of the
process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) when it has one. In a container
or a SLURM job psutil reports the whole machine's free memory; a budget taken from it alone gets
the job OOM-killed instead of streaming."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 1 << 60
"""cgroup v1 writes "no limit" as 2**63 - 1 rounded to a page; any limit above this is none."""


def _own_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory-controller path) of this process, from /proc/self/cgroup's text."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _read_int(path: Path) -> int | None:
    """An integer cgroup file's value; None when it is absent, unreadable or "max" (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    value = int(text)
    return None if value >= NO_LIMIT else value


def cgroup_room(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> tuple[int, int] | None:
    """(limit, limit - usage) in bytes of the tightest memory limit on this process's cgroup or one of
    its ancestors (SLURM limits the job, the process sits in a step below it), v2 and v1 layouts
    under ``root``; None without a limit. ``proc_cgroup``: /proc/self/cgroup's text (read when None)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    v2, v1 = _own_paths(proc_cgroup)
    layouts = [(root, v2 or "/", "memory.max", "memory.current"),
               (root / "memory", v1 or "/", "memory.limit_in_bytes", "memory.usage_in_bytes")]
    best: tuple[int, int] | None = None
    for base, own, limit_file, usage_file in layouts:
        parts = [p for p in own.split("/") if p]
        for depth in range(len(parts), -1, -1):  # own cgroup, then each ancestor up to the root
            folder = base.joinpath(*parts[:depth])
            limit = _read_int(folder / limit_file)
            if limit is None:
                continue
            room = max(0, limit - (_read_int(folder / usage_file) or 0))
            if best is None or room < best[1]:
                best = (limit, room)
    return best


def available_memory(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """Bytes this process may still allocate: psutil's available memory, capped by :func:`cgroup_room`."""
    import psutil

    free = int(psutil.virtual_memory().available)
    room = cgroup_room(root, proc_cgroup)
    return free if room is None else min(free, room[1])
