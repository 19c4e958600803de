"""Shared varstores: which of the domains using one varstore file keeps it (pure).

Two guests writing one varstore corrupt each other's variables. Domains share a file
when their `<nvram>` paths resolve to it: the same path after resolving symlinks, or
the same device and inode (a hard link), whatever the file is called. This happens
with hand-made clones (the XML copied, the varstore not) and after `virsh domrename`,
which leaves `<old>_VARS.fd` in the renamed domain's XML: a later domain defined with
the old name gets that very path from libvirt.

Rules, in order: the one user varsd does not manage (opted out, excluded, transient)
keeps the file, as it cannot be moved; else the one user varsd has bound (it had this
varstore when varsd last looked: a renamed domain, never the newcomer that took its old
name); else the one whose libvirt-named `<name>_VARS.fd` it is, not through a symlink;
else nobody does. Every other user gets its own copy with every variable kept, once
no user of the file is running (a running guest may be writing it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class VarstoreUser:
    """One domain naming a varstore file, as the engine read it."""

    uuid: str
    name: str
    path: str
    own: bool = False  # the path is libvirt's `<nvram_dir>/<name>_VARS.fd` for this domain
    link: bool = False  # the path is a symlink
    bound: bool = False  # varsd metadata binds it to a build
    managed: bool = True  # varsd may change it (not opted out, excluded or transient)
    running: bool = False


@dataclass(frozen=True)
class Sharing:
    """What one user of a shared file must know: who else uses it, whether it keeps it."""

    others: tuple[str, ...]  # names of the other domains using the file
    keeps: bool  # this domain keeps the file; the others get copies
    keeper: str | None = None  # name of the domain that keeps it, if any
    running: tuple[str, ...] = ()  # other users running now: no copy is taken meanwhile


def _only(users: Sequence[VarstoreUser]) -> VarstoreUser | None:
    return users[0] if len(users) == 1 else None


def keeper(users: Sequence[VarstoreUser]) -> VarstoreUser | None:
    """The user that keeps the shared file (module rules), or None when all get copies."""
    unmanaged = [u for u in users if not u.managed]
    if unmanaged:
        return _only(unmanaged)
    for rule in (lambda u: u.bound and not u.link, lambda u: u.own and not u.link):
        chosen = _only([u for u in users if rule(u)])
        if chosen is not None:
            return chosen
    return None


def decide(me: VarstoreUser, others: Sequence[VarstoreUser]) -> Sharing | None:
    """`me`'s view of its varstore file; None when nobody else uses it."""
    if not others:
        return None
    kept = keeper([me, *others])
    return Sharing(
        others=tuple(sorted(o.name for o in others)),
        keeps=kept is not None and kept.uuid == me.uuid,
        keeper=kept.name if kept is not None else None,
        running=tuple(sorted(o.name for o in others if o.running)),
    )
