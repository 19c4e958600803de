"""Is varsd's libvirt QEMU hook in force? What `varsctl status` says about it.

The hook (`/etc/libvirt/hooks/qemu.d/varsd`) makes a `virsh start` wait for an offline
varstore write varsd has in hand (`engine/offline_write.py`). libvirt looks for QEMU hooks
only when its daemon starts: a daemon that was running when the hook first appeared (and
had no QEMU hook at all then) never runs it until it is restarted. Files alone cannot tell
that apart from a varsd upgrade (dpkg replaces the link, so its times change every time),
so whoever installs the hook where libvirt already runs records it: the package's
postinst (first install only, when no other QEMU hook exists) writes `PENDING`, one line
`NAME PID STARTTIME` per running libvirt daemon, STARTTIME being field 22 of
`/proc/PID/stat`. The hook is pending exactly while one of those processes still runs;
a restart (or a reboot) makes the record stale.

Only the local system daemon runs this host's hooks; for any other URI nothing is judged.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

HOOK = "/etc/libvirt/hooks/qemu.d/varsd"
PENDING = "/run/varsd-qemu-hook.pending"
LOCAL_URIS = ("qemu:///system",)


class HookState(enum.Enum):
    ACTIVE = "active"
    PENDING_RESTART = "pending-restart"  # installed, but the running libvirt daemon has not loaded it
    MISSING = "missing"  # not installed (or not executable): starts never wait for a write
    NOT_CHECKED = "not-checked"  # not the local system daemon: its hooks are not this host's files


@dataclass(frozen=True)
class HookReport:
    state: HookState
    detail: str

    @property
    def attention(self) -> bool:
        return self.state in (HookState.PENDING_RESTART, HookState.MISSING)

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state.value, "detail": self.detail}


@dataclass(frozen=True)
class DaemonStamp:
    """A libvirt daemon process as the installer saw it: its name, PID and start time (ticks since boot)."""

    name: str
    pid: int
    started: int


def parse_pending(text: str) -> list[DaemonStamp]:
    """The installer's record; lines that are not `NAME PID STARTTIME` are ignored (it is advice, not state)."""
    stamps = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            stamps.append(DaemonStamp(parts[0], int(parts[1]), int(parts[2])))
    return stamps


def judge(uri: str, hook_runnable: bool, pending: Iterable[DaemonStamp],
          started: Callable[[int], int | None]) -> HookReport:
    """The hook's state from the facts; `started(pid)` is that process's start time now (None: gone)."""
    if uri not in LOCAL_URIS:
        return HookReport(HookState.NOT_CHECKED, f"{uri} is not this host's system daemon: its hooks are not checked")
    if not hook_runnable:
        return HookReport(HookState.MISSING,
                          f"{HOOK} is missing or not executable: a 'virsh start' does not wait for varsd's "
                          "offline varstore writes (reinstall the varsd package, or run scripts/host-setup)")
    for d in pending:
        if started(d.pid) == d.started:
            return HookReport(HookState.PENDING_RESTART,
                              f"{d.name} (pid {d.pid}) was running when {HOOK} was installed and loads QEMU hooks "
                              f"only when it starts: run 'systemctl restart {d.name}' (running guests keep "
                              "running) so that starts wait for varsd's offline varstore writes")
    return HookReport(HookState.ACTIVE, f"{HOOK} is in force")


def process_started(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def probe(uri: str, *, hook: str = HOOK, pending: str = PENDING) -> HookReport:
    """Look at this host: the hook file and the installer's record."""
    runnable = os.path.isfile(hook) and os.access(hook, os.X_OK)
    try:
        with open(pending, encoding="utf-8", errors="replace") as f:
            stamps = parse_pending(f.read(4096))
    except OSError:
        stamps = []
    return judge(uri, runnable, stamps, process_started)
