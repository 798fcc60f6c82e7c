"""What the process may use: free memory from /proc/meminfo and the memory cgroups, on fake file trees."""

from pathlib import Path

import pytest

from qsmprep.resources import available_memory_bytes

GIB = 2**30


def _write(root, relative, text):
    path = Path(root) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def proc(tmp_path):
    """A procfs with 20 GiB available and the process in the v2 cgroup /job (and, on v1, memory:/job)."""
    root = tmp_path / "proc"
    _write(root, "meminfo", f"MemTotal:       {24 * GIB // 1024} kB\nMemAvailable:   {20 * GIB // 1024} kB\n")
    _write(root, "self/cgroup", "4:memory:/job\n3:cpuset:/\n0::/job\n")
    return root


def test_without_cgroup_limits_the_kernel_estimate_is_used(proc, tmp_path):
    assert available_memory_bytes(proc, tmp_path / "no-cgroup-fs") == 20 * GIB


def test_a_cgroup_v2_limit_caps_it_counting_inactive_file_cache_as_free(proc, tmp_path):
    cgroup = tmp_path / "cgroup"
    _write(cgroup, "job/memory.max", f"{4 * GIB}\n")
    _write(cgroup, "job/memory.current", f"{3 * GIB}\n")
    _write(cgroup, "job/memory.stat", f"anon {2 * GIB}\ninactive_file {GIB // 2}\n")
    _write(cgroup, "memory.max", "max\n")  # the root: no limit
    _write(cgroup, "memory.current", f"{10 * GIB}\n")
    assert available_memory_bytes(proc, cgroup) == 4 * GIB - 3 * GIB + GIB // 2


def test_the_tightest_v1_ancestor_counts_and_unmounted_paths_fall_back_to_the_root(proc, tmp_path):
    cgroup = tmp_path / "cgroup"
    # /job is not mounted (as inside a container); the mounted root carries the container's limit
    _write(cgroup, "memory/memory.limit_in_bytes", f"{8 * GIB}\n")
    _write(cgroup, "memory/memory.usage_in_bytes", f"{5 * GIB}\n")
    _write(cgroup, "memory/memory.stat", f"total_inactive_file {GIB}\n")
    assert available_memory_bytes(proc, cgroup) == 4 * GIB
    # mounted, unlimited (v1 writes a huge number): the root's limit still applies
    _write(cgroup, "memory/job/memory.limit_in_bytes", "9223372036854771712\n")
    _write(cgroup, "memory/job/memory.usage_in_bytes", f"{GIB}\n")
    assert available_memory_bytes(proc, cgroup) == 4 * GIB
    _write(cgroup, "memory/job/memory.limit_in_bytes", f"{2 * GIB}\n")
    assert available_memory_bytes(proc, cgroup) == GIB


def test_nothing_readable_gives_none(tmp_path):
    assert available_memory_bytes(tmp_path / "proc", tmp_path / "cgroup") is None


def test_this_machine_reports_a_positive_amount_below_its_total():
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo (not Linux)")
    total = int(meminfo.read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < available_memory_bytes() <= total
