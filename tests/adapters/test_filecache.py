"""filecache: one entry per name, recomputed when the stat key changes, nothing cached on failure."""

from __future__ import annotations

import os

import pytest

from varsd.adapters.filecache import ContentCache, stat_key, stat_key_of


def test_recomputes_only_when_the_file_changed(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    cache: ContentCache[bytes] = ContentCache()
    calls = []

    def read() -> bytes:
        calls.append(1)
        return path.read_bytes()

    assert cache.get("f", stat_key_of(str(path)), read) == b"one"
    assert cache.get("f", stat_key_of(str(path)), read) == b"one" and len(calls) == 1
    tmp = tmp_path / "f.new"
    tmp.write_bytes(b"two")
    os.replace(tmp, path)  # a package upgrade: new inode
    assert cache.get("f", stat_key_of(str(path)), read) == b"two" and len(calls) == 2
    assert len(cache) == 1


def test_a_failing_compute_caches_nothing_and_the_limit_bounds_names(tmp_path) -> None:
    cache: ContentCache[int] = ContentCache(limit=2)
    with pytest.raises(OSError):
        cache.get("x", (1,), lambda: (_ for _ in ()).throw(OSError("gone")))
    assert len(cache) == 0
    for n in range(5):
        cache.get(n, (n,), lambda n=n: n)
    assert len(cache) <= 2
    st = os.stat(tmp_path)
    assert stat_key(st) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    assert stat_key(st, ctime=True)[-1] == st.st_ctime_ns
    assert stat_key_of(str(tmp_path / "missing")) is None
