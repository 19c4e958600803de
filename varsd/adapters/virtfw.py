"""The one place that imports virt-firmware: varstore parsing and writing.

virt-firmware is the field's varstore library, but it exits the process on bad input
(`sys.exit(1)` raises SystemExit, which `except Exception` misses), logs to the root
logger and reads files in constructors. Everything here catches that and raises
VarstoreError naming the file, so callers never see a library hazard.
"""

from __future__ import annotations

import logging
import os
import tempfile

from varsd.errors import VarstoreError
from varsd.model.firmware import VarstoreLayout


def _edk2(path: str):
    from virt.firmware.varstore.edk2 import Edk2VarStore

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # the library logs "varstore not found" at ERROR
    try:
        return Edk2VarStore(path)
    except SystemExit:
        raise VarstoreError(f"{path}: not an edk2 varstore (no valid NvData volume found)") from None
    except FileNotFoundError:
        raise VarstoreError(f"{path}: file not found") from None
    except OSError as exc:
        raise VarstoreError(f"{path}: cannot read: {exc.strerror}") from None
    except Exception as exc:  # struct errors on truncated files and the like
        raise VarstoreError(f"{path}: not an edk2 varstore ({exc})") from None
    finally:
        root.setLevel(level)


def read_layout(path: str) -> VarstoreLayout:
    """Layout of the varstore at the start of `path` (a varstore or unified image).

    For a unified image, `size` is the varstore part only: the end of the NvData
    firmware volume that holds the variables.
    """
    store = _edk2(path)
    volume_size = _nvdata_volume_end(store.filedata)
    return VarstoreLayout(size=volume_size, start=store.start, end=store.end)


def _nvdata_volume_end(data: bytes) -> int:
    """End of the varstore region: offset plus length of the NvData firmware volume.

    In OVMF the NvData volume header's length covers the whole varstore region
    (variables + FTW working block + spare): 0x20000 for 2 MiB builds, 0x84000 for
    4 MiB ones. In a unified image the code volumes follow it.
    """
    import struct

    from virt.firmware.varstore.edk2 import Edk2VarStore

    offset = Edk2VarStore.find_nvdata(data)
    if offset is None:
        return len(data)
    (vlen,) = struct.unpack_from("<Q", data, offset + 32)
    return min(len(data), offset + vlen)
