"""varsd.planning.sharing: who keeps a varstore file several domains use (pure table)."""

from __future__ import annotations

import pytest

from varsd.planning.sharing import VarstoreUser, decide, keeper

P = "/var/lib/libvirt/qemu/nvram/base_VARS.fd"


def u(name: str, **kw) -> VarstoreUser:
    return VarstoreUser(uuid=f"uuid-{name}", name=name, path=kw.pop("path", P), **kw)


ROWS = [
    ("clone of base: base's own file", [u("base", own=True), u("clone")], "base"),
    ("clone with copied metadata: both bound, the file's name decides",
     [u("base", own=True, bound=True), u("clone", bound=True)], "base"),
    ("domrename: the renamed (bound) domain keeps, not the newcomer with the old name",
     [u("new", bound=True), u("old", own=True)], "new"),
    ("an opted-out user cannot be changed: it keeps", [u("frozen", managed=False), u("base", own=True, bound=True)],
     "frozen"),
    ("two unmanaged users: nobody can keep it for both", [u("a", managed=False), u("b", managed=False)], None),
    ("own name only through a symlink does not count", [u("a", own=True, link=True), u("b")], None),
    ("nobody's own, nobody bound: every user gets a copy", [u("a"), u("b"), u("c")], None),
]


@pytest.mark.parametrize(("users", "kept"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_keeper(users: list[VarstoreUser], kept: str | None) -> None:
    got = keeper(users)
    assert (got.name if got else None) == kept
    for me in users:  # every user agrees on who keeps it
        view = decide(me, [o for o in users if o is not me])
        assert view is not None and view.keeps is (me.name == kept) and view.keeper == kept


def test_alone_is_not_shared() -> None:
    assert decide(u("a"), []) is None


def test_running_others_are_named() -> None:
    view = decide(u("clone"), [u("base", own=True, running=True)])
    assert view is not None and view.running == ("base",) and not view.keeps
