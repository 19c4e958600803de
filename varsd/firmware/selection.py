"""Choosing a build from the catalog for a domain, the way libvirt autoselects firmware.

Rules (after libvirt's qemuFirmwareMatchDomain in src/qemu/qemu_firmware.c):

- Builds are tried in catalog order; the first that passes every check wins.
- Checks (`fit.misfits`, in its order): mapping mode and raw format; a target whose
  architecture equals `arch` and one of whose machine globs matches `machine`
  (fnmatch, like g_pattern_match_simple); `secure-boot` present exactly when Secure
  Boot is wanted; if `enrolled_keys` is given, `enrolled-keys` present exactly when
  wanted; no `requires-smm` when the domain cannot have SMM; then, to keep an
  existing varstore usable, the template layout and the code size when given.
- Stricter than libvirt on purpose: libvirt leaves Secure Boot "don't care" when
  the XML does not say; varsd always knows which one the domain runs, and swapping
  a Secure Boot build for a plain one (or back) changes what the guest trusts.
- Whether one build fits is `varsd.firmware.fit.misfits` (machine aliases included);
  this module only walks the catalog in order and explains what it passed over.

Everything here is pure: no I/O, no logging.
"""

from __future__ import annotations

from typing import Any

from varsd.firmware.fit import Needs, misfits
from varsd.model.firmware import Build, Catalog


def first_fit(catalog: Catalog, needs: Needs) -> Build | None:
    """The first build in catalog order with no misfit, or None."""
    return next((b for b in catalog.builds if not misfits(b, needs)), None)


def select_build(catalog: Catalog, **needs: Any) -> Build | None:
    """The first build in catalog order that fits (module rules); keywords are `Needs` fields."""
    return first_fit(catalog, Needs(**needs))


def explain(catalog: Catalog, needs: Needs) -> str:
    """An admin-readable sentence: what was asked for and why each build was passed over.

    If a build does fit, says which one, so callers may use it unconditionally in reports.
    """
    found = first_fit(catalog, needs)
    if found is not None:
        return f"{found.origin} fits: {found.label}"
    head = needs.describe()
    if not catalog.builds:
        tail = "the firmware catalog is empty"
        if catalog.problems:
            tail += f" ({len(catalog.problems)} descriptor(s) could not be used, see the catalog problems)"
        return f"{head}: {tail}"
    reasons = "; ".join(f"{b.origin}: {misfits(b, needs)[0].phrase}" for b in catalog.builds)
    return f"{head}. Passed over: {reasons}"


def explain_no_build(catalog: Catalog, **needs: Any) -> str:
    """`explain` with `select_build`'s keywords."""
    return explain(catalog, Needs(**needs))
