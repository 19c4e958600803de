"""sd_notify over a real AF_UNIX datagram socket; watchdog interval from systemd's variables."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from varsd.daemon.notify import sd_notify, watchdog_interval


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_sends_one_datagram_with_all_lines(receiver, monkeypatch):
    path, sock = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify("READY=1", "STATUS=12 domains, all fine") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=12 domains, all fine"
    assert sd_notify("WATCHDOG=1") is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket(monkeypatch):
    name = f"varsd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_without_notify_socket_it_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sd_notify("READY=1") is False


def test_nobody_listening_is_false_not_an_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "no-socket-here"))
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@varsd-test-nobody-{uuid.uuid4().hex}")
    assert sd_notify("READY=1") is False


def test_a_path_that_is_not_a_socket_is_false(tmp_path, monkeypatch):
    plain = tmp_path / "file"
    plain.write_text("")
    monkeypatch.setenv("NOTIFY_SOCKET", str(plain))
    assert sd_notify("READY=1") is False


@pytest.mark.parametrize(
    "usec, pid, expected",
    [
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("1000000", "self", 0.5),
        ("60000000", "1", None),  # meant for another process (e.g. the main PID of a wrapper)
        ("60000000", "not-a-pid", None),
        (None, "self", None),
        ("", None, None),
        ("sixty", None, None),
        ("0", None, None),  # systemd: 0 means no watchdog (sd_watchdog_enabled says so too)
        ("-5", None, None),
        ("1.5", None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert watchdog_interval() == expected
