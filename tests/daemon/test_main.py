"""varsd's entry point tunes glibc's malloc before any thread starts, unless the admin did."""

from __future__ import annotations

import pytest

from varsd.daemon import main


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def libc(monkeypatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(main.ctypes, "CDLL", lambda _name: fake)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return fake


def test_one_arena_and_a_fixed_mmap_threshold(libc) -> None:
    main.tune_malloc()
    assert sorted(libc.calls) == sorted([(main.M_ARENA_MAX, 1), (main.M_MMAP_THRESHOLD, main.MMAP_THRESHOLD)])


def test_the_admins_malloc_settings_win(libc, monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    main.tune_malloc()
    assert libc.calls == [(main.M_MMAP_THRESHOLD, main.MMAP_THRESHOLD)]
    libc.calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    main.tune_malloc()
    assert libc.calls == []


def test_a_libc_without_mallopt_is_left_as_it_is(monkeypatch) -> None:
    monkeypatch.setattr(main.ctypes, "CDLL", lambda _name: object())
    assert main.tune_malloc() is None  # returns quietly: no AttributeError
