"""What this process may use of the machine: CPU cores and free memory.

Both follow what a scheduler or container grants the process (CPU affinity,
memory cgroup), not the machine's totals, so that a SLURM job or a
``docker run --memory`` limit is respected.
"""

import os
from pathlib import Path

UNLIMITED_BYTES = 2**60
"""cgroup v1 writes "no limit" as a huge number (2^63 rounded to a page); anything above this is no limit."""


def available_cores():
    """Cores this process may run on: its CPU affinity (what SLURM, taskset or a container grant), not the machine's."""
    return len(os.sched_getaffinity(0))


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _stat_value(text, key):
    """Value of ``key`` in a /proc/meminfo or cgroup memory.stat text (first number on its line), or None."""
    for line in (text or "").splitlines():
        words = line.replace(":", " ").split()
        if len(words) > 1 and words[0] == key:
            return int(words[1])
    return None


def _cgroup_dirs(proc, cgroup):
    """This process's memory-cgroup directories, innermost first, for the unified (v2) and v1 memory hierarchies.

    A cgroup path that is not mounted inside a container falls back to its
    nearest mounted ancestor (the container's own cgroup is mounted as the root).
    """
    for line in (_read(Path(proc) / "self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root = Path(cgroup)
        elif "memory" in controllers.split(","):
            root = Path(cgroup) / "memory"
        else:
            continue
        directory = root / path.lstrip("/")
        while directory != root and not directory.is_dir():
            directory = directory.parent
        while True:
            yield directory
            if directory == root:
                break
            directory = directory.parent


def _cgroup_headroom(directory):
    """Bytes the cgroup in ``directory`` may still allocate (limit - usage + reclaimable file cache), or None."""
    for limit_file, usage_file, inactive_key in (
            ("memory.max", "memory.current", "inactive_file"),  # v2
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):  # v1
        limit, usage = _read(directory / limit_file), _read(directory / usage_file)
        if limit is None or usage is None or limit.strip() == "max" or int(limit) >= UNLIMITED_BYTES:
            continue
        inactive = _stat_value(_read(directory / "memory.stat"), inactive_key) or 0
        return max(0, int(limit) - int(usage) + inactive)
    return None


def available_memory_bytes(proc="/proc", cgroup="/sys/fs/cgroup"):
    """Memory this process may still allocate, in bytes, or None where it cannot be read (not Linux).

    The kernel's estimate of memory available without swapping
    (``MemAvailable`` in /proc/meminfo), capped by the headroom of every
    memory cgroup the process is in (container, SLURM job): its limit less
    its usage, counting inactive file cache as free because the kernel
    reclaims it before killing.

    Parameters
    ----------
    proc, cgroup : str or Path, default "/proc", "/sys/fs/cgroup"
        Where procfs and the cgroup file system are mounted (tests pass fakes).
    """
    kib = _stat_value(_read(Path(proc) / "meminfo"), "MemAvailable")
    candidates = [] if kib is None else [kib * 1024]
    candidates += [h for h in map(_cgroup_headroom, _cgroup_dirs(proc, cgroup)) if h is not None]
    return min(candidates) if candidates else None
