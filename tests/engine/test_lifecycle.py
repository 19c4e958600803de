"""Which renamed domain's varstore moves (pure decision)."""

from __future__ import annotations

import logging

from varsd.engine.backups import PassResult, Target
from varsd.engine.lifecycle import Lifecycle, renamed_varstore
from varsd.model.domain import DomainFirmware

NV = "/var/lib/libvirt/qemu/nvram"


def _fw(name: str, nvram: str | None) -> DomainFirmware:
    return DomainFirmware(name=name, uuid="00000000-0000-4000-8000-000000000001", arch="x86_64", machine="q35",
                          nvram_path=nvram)


def test_domrename_leaves_the_old_name_which_moves_to_the_new_one():
    assert renamed_varstore(_fw("web2", f"{NV}/web1_VARS.fd"), NV, [("db", f"{NV}/db_VARS.fd")]) == \
        f"{NV}/web2_VARS.fd"


def test_nothing_moves_when_the_file_is_already_right_or_not_libvirts():
    assert renamed_varstore(_fw("web1", f"{NV}/web1_VARS.fd"), NV, []) is None
    assert renamed_varstore(_fw("web2", "/srv/vm/web1_VARS.fd"), NV, []) is None  # admin's own place
    assert renamed_varstore(_fw("web2", f"{NV}/web1.fd"), NV, []) is None
    assert renamed_varstore(_fw("web2", None), NV, []) is None


def test_a_file_another_domain_owns_or_uses_never_moves():
    assert renamed_varstore(_fw("clone", f"{NV}/web1_VARS.fd"), NV, [("web1", f"{NV}/web1_VARS.fd")]) is None
    assert renamed_varstore(_fw("clone", f"{NV}/gone_VARS.fd"), NV, [("other", f"{NV}/gone_VARS.fd")]) is None
    assert renamed_varstore(_fw("b", f"{NV}/a_VARS.fd"), NV, [("a", None)]) is None


def test_a_backup_failure_is_logged_once_when_it_starts_and_once_when_it_clears(caplog):
    """Issue 9 point 6: not at every pass (nightly, at every stop)."""
    life = Lifecycle.__new__(Lifecycle)  # only the logging state: no libvirt, no store
    life._failing = {}
    t = Target("0c000000-0000-4000-8000-000000000001", "web1", "/n/web1_VARS.fd")
    with caplog.at_level(logging.DEBUG, logger="varsd"):
        for _ in range(3):
            life._log_results([PassResult(t, error="/n/web1_VARS.fd: cannot open: permission denied")])
        life._log_results([PassResult(t, unchanged=True)])
        life._log_results([PassResult(t, unchanged=True)])
    above_debug = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
    assert above_debug == [
        ("ERROR", "domain 'web1': backup failed: /n/web1_VARS.fd: cannot open: permission denied"),
        ("INFO", "domain 'web1': backups work again"),
    ]
