"""Every domain's XML for one pass over all of them, fetched by a helper thread.

`varsctl status` and `firmware sync` read each domain's persistent definition (and the
live one when it runs) once per pass. The round trips to libvirtd release the GIL, so a
thread of its own fetching them overlaps the Python work on the domains before them: the
pass costs about the longer of the two, not their sum.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

from varsd.adapters.libvirt_api import Hypervisor
from varsd.model.domain import DomainRef

Seen = tuple[str, str | None]  # (persistent XML, live XML or None: not running)

FETCHERS = 1  # threads fetching XML; more did not measure faster on 2 cores shared with libvirtd


def fetched(hv: Hypervisor, refs: Sequence[DomainRef]) -> Iterator[tuple[int, DomainRef, Seen | None]]:
    """(index, ref, (persistent XML, live XML or None)) for each domain, in order; None when
    it could not be read (the caller's per-domain path looks again and reports it)."""
    results: queue.SimpleQueue = queue.SimpleQueue()

    def fetch(start: int) -> None:
        for i in range(start, len(refs), FETCHERS):
            ref = refs[i]
            try:
                xml = hv.persistent_xml(ref.uuid)
                results.put((i, (xml, hv.live_xml(ref.uuid) if ref.active else None)))
            except Exception:  # noqa: BLE001 - the per-domain path looks again and reports it
                results.put((i, None))

    workers = [threading.Thread(target=fetch, args=(n,), name=f"varsd-fetch-{n}", daemon=True)
               for n in range(min(FETCHERS, len(refs)))]
    for w in workers:
        w.start()
    try:
        for _ in refs:
            i, xml = results.get()
            yield i, refs[i], xml
    finally:
        for w in workers:
            w.join()
