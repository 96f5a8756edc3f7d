"""The memory the daemon plans with (daemon/engine/budget.available_bytes) sees a cgroup's limit:
v2 and v1 hierarchies laid out as the kernel shows them, written as real files."""

from __future__ import annotations

import psutil

from moed.daemon.engine.budget import available_bytes, cgroup_available

GB = 1 << 30


def _v2(root, path, limit, current, inactive):
    d = root.joinpath(*path.strip("/").split("/")) if path.strip("/") else root
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{current}\n")
    (d / "memory.stat").write_text(f"anon 1\nfile 2\ninactive_file {inactive // 2}\nactive_file {inactive - inactive // 2}\n")


def test_a_cgroup_v2_limit_counts_its_usage_less_its_page_cache(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/moed.scope\n")
    root = tmp_path / "fs"
    _v2(root, "/", "max", 9 * GB, 0)
    _v2(root, "/user.slice", "max", 5 * GB, 0)
    _v2(root, "/user.slice/moed.scope", 4 * GB, 3 * GB, GB // 2)
    assert cgroup_available(proc, root) == 4 * GB - (3 * GB - GB // 2)
    _v2(root, "/user.slice", 2 * GB, 1 * GB, 0)  # a tighter ancestor wins
    assert cgroup_available(proc, root) == 1 * GB
    _v2(root, "/user.slice", "max", 0, 0)
    _v2(root, "/user.slice/moed.scope", "max", 3 * GB, 0)
    assert cgroup_available(proc, root) is None  # no limit anywhere


def test_a_cgroup_v1_memory_limit_and_no_cgroup_at_all(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:devices:/\n4:memory:/box/7\n0::/\n")
    d = tmp_path / "fs" / "memory" / "box" / "7"
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(str(6 * GB))
    (d / "memory.usage_in_bytes").write_text(str(2 * GB))
    (d / "memory.stat").write_text(f"cache 5\ninactive_file 7\ntotal_inactive_file {GB // 4}\ntotal_active_file {3 * GB // 4}\n")
    assert cgroup_available(proc, tmp_path / "fs") == 5 * GB
    (d / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "unlimited"
    assert cgroup_available(proc, tmp_path / "fs") is None
    assert cgroup_available(tmp_path / "absent", tmp_path / "fs") is None  # macOS: no /proc/self/cgroup


def test_available_bytes_never_exceeds_the_machines(monkeypatch):
    monkeypatch.delenv("MOED_RAM_GB", raising=False)
    assert 0 < available_bytes() <= psutil.virtual_memory().total
    monkeypatch.setenv("MOED_RAM_GB", "0.5")
    assert available_bytes() == 500_000_000
