"""The one place that imports virt-firmware: varstore parsing and writing.

virt-firmware is the field's varstore library, but it exits the process on bad input
(`sys.exit(1)` raises SystemExit, which `except Exception` misses), logs to the root
logger (and thereby runs `logging.basicConfig()` behind the application's back),
loops forever on a firmware volume header of length 0, and reads files in
constructors. This module contains all of that:

- Stores are parsed from bytes already in memory (a subclass feeds them), so the
  library never opens a user's file, let alone writes one. Everything here returns
  bytes; writing them is `fsio.create_exclusive`'s job.
- The library's `logging` calls are routed to the `varsd.virtfw` logger at DEBUG.
- Every failure is a VarstoreError naming the file; never SystemExit.
- Variables are keyed by "<guid>:<name>": the library's own `get_varlist` keys by
  name only, silently dropping one of two variables that share a name under
  different vendor GUIDs, so this module walks the store itself (mirroring edk2's
  rules for which variable records are live) and keeps each record byte-exact.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import logging
import os
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from virt.firmware.efi import bootentry, devpath, efivar, guids, siglist, ucs16
from virt.firmware.efi import certs as vf_certs
from virt.firmware.varstore import edk2

from varsd.adapters import fsio
from varsd.errors import VarstoreError
from varsd.model.firmware import VarstoreLayout
from varsd.model.secureboot import MICROSOFT_OWNER, MS_2023_CERTS, Certificate, Pcr7, SecureBootVars, ShippedCert
from varsd.model.varstore import EfiVariable

log = logging.getLogger("varsd.virtfw")

# edk2 variable record: StartId, State, Attributes, MonotonicCount, TimeStamp (16),
# PubKeyIndex, NameSize, DataSize, VendorGuid (16), then name and data.
_HEADER = struct.Struct("<HBxLQ16sLLL16s")
_VAR_START_ID = 0x55AA
_VAR_ADDED = 0x3F
_VAR_ADDED_IN_DELETED_TRANSITION = 0x3F & 0xFE
_FV_HEADER_MIN = 0x48  # EFI_FIRMWARE_VOLUME_HEADER with one block map entry + terminator

ATTR_NV_BS_RT = 0x7
"""NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS: what BootOrder and Boot#### use."""


class _LibraryLog:
    """Stands in for the `logging` module inside virt-firmware's edk2 module.

    Messages go to our logger at DEBUG; the last error per thread is kept so the
    VarstoreError can say why the library gave up before calling sys.exit().
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _emit(self, level: int, msg: str, *args: Any, **_kw: Any) -> None:
        text = msg % args if args else msg
        if level >= logging.ERROR:
            self._local.last_error = text
        log.debug("virt-firmware: %s", text)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit(logging.DEBUG, msg, *args, **kw)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit(logging.INFO, msg, *args, **kw)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit(logging.WARNING, msg, *args, **kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit(logging.ERROR, msg, *args, **kw)

    def take_error(self) -> str | None:
        text = getattr(self._local, "last_error", None)
        self._local.last_error = None
        return text

    def __getattr__(self, name: str) -> Any:  # constants such as logging.DEBUG
        return getattr(logging, name)


_liblog = _LibraryLog()
edk2.logging = _liblog  # type: ignore[attr-defined]
siglist.logging = _liblog  # type: ignore[attr-defined]


def _find_nvdata(data: bytes) -> int | None:
    """edk2.Edk2VarStore.find_nvdata, minus its endless loop on a volume length < header, and
    looking in the first MiB only (where every varstore's volume starts, see `read_layout`):
    the library's 1 KiB steps through a 64 MiB AAVMF code image's padding take seconds."""
    offset = 0
    while offset + 64 < len(data) and offset < _HEAD:
        guid = str(guids.parse_bin(data, offset + 16))
        if guid == guids.NvData:
            return offset
        if guid == guids.Ffs:
            (vlen,) = struct.unpack_from("<Q", data, offset + 32)
            if vlen < _FV_HEADER_MIN:
                return None
            offset += vlen
            continue
        offset += 1024
    return None


class _BytesVarStore(edk2.Edk2VarStore):
    """An Edk2VarStore parsed from bytes in memory; `filename` is only used in messages."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data = bytes(data)
        super().__init__(name)

    def readfile(self) -> None:
        self.filedata = self._data

    @staticmethod
    def find_nvdata(data: bytes) -> int | None:
        return _find_nvdata(data)

    def write_varstore(self, filename: str, varlist: Any) -> None:
        raise AssertionError("varsd never lets virt-firmware write files")


class _RawVar(efivar.EfiVar):
    """An EfiVar that serialises back to exactly the record it was read from.

    The library's EfiVar re-encodes the timestamp (dropping nanoseconds and the time
    zone) and parses signature databases by variable name alone; neither is wanted
    when carrying a guest's variables over, so the constructor is bypassed and the
    raw timestamp kept. `bytes_var` only needs the attributes set here.
    """

    def __init__(self, name: str, guid: str, attr: int, data: bytes, count: int, pkidx: int, raw_time: bytes):
        # deliberately not calling EfiVar.__init__ (see class docstring)
        self.name = ucs16.from_string(name)
        self.guid = guids.parse_str(guid)
        self.attr = attr
        self.data = data
        self.count = count
        self.pkidx = pkidx
        self.time = None
        self.sigdb = None
        self.raw_time = raw_time

    def bytes_time(self) -> bytes:
        return self.raw_time

    def public(self) -> EfiVariable:
        return EfiVariable(name=str(self.name), guid=str(self.guid), attr=self.attr, data=self.data)


@dataclass(frozen=True)
class _Parsed:
    store: _BytesVarStore
    layout: VarstoreLayout
    records: dict[str, _RawVar]  # key "<name>\0<guid>": the library sorts by key, so name order is kept


def _read(path: str, length: int | None) -> bytes:
    try:
        if length is None:
            return fsio.read_file(path)
        return fsio.read_prefix(path, length, follow_symlinks=True)
    except fsio.ReadError as exc:
        raise VarstoreError(str(exc)) from None


def _parse(data: bytes, name: str) -> _Parsed:
    """Parse and sanity-check a varstore (or a unified image's leading varstore)."""
    _liblog.take_error()
    try:
        store = _BytesVarStore(data, name)
    except SystemExit:
        why = (_liblog.take_error() or "").removeprefix(f"{name}: ")
        if why in ("", "varstore not found"):
            why = "no NvData firmware volume holding variables found"
        raise VarstoreError(f"{name}: not an edk2 varstore ({why})") from None
    except Exception as exc:  # struct errors on short files and the like
        raise VarstoreError(f"{name}: not an edk2 varstore ({exc})") from None
    offset = _find_nvdata(data)
    if offset is None:  # cannot happen: parse_volume just found it
        raise VarstoreError(f"{name}: not an edk2 varstore")
    (vlen,) = struct.unpack_from("<Q", data, offset + 32)
    volume_end = offset + vlen
    if volume_end > len(data) or not (offset < store.start <= store.end <= volume_end):
        raise VarstoreError(
            f"{name}: truncated or damaged edk2 varstore (volume ends at 0x{volume_end:x}, "
            f"variables 0x{store.start:x}-0x{store.end:x}, file has 0x{len(data):x} bytes)"
        )
    size = len(data) if is_padded(data, volume_end) else volume_end
    layout = VarstoreLayout(size=size, start=store.start, end=store.end)
    return _Parsed(store=store, layout=layout, records=_walk(store.filedata, store.start, store.end, name))


def _walk(data: bytes, start: int, end: int, name: str) -> dict[str, _RawVar]:
    """The live variables between `start` and `end`, as edk2's FindVariable sees them.

    A record in state ADDED is live; one caught IN_DELETED_TRANSITION by a power
    cut is live only when no ADDED copy of the same variable exists. The walk stops
    at the first slot without a record header, like edk2's.
    """
    added: dict[str, _RawVar] = {}
    in_transition: dict[str, _RawVar] = {}
    pos = start
    while pos + _HEADER.size <= end:
        magic, state, attr, count, raw_time, pkidx, nsize, dsize, guid_le = _HEADER.unpack_from(data, pos)
        if magic != _VAR_START_ID:
            break
        name_at = pos + _HEADER.size
        data_at = name_at + nsize
        next_pos = (data_at + dsize + 3) & ~3
        live = state in (_VAR_ADDED, _VAR_ADDED_IN_DELETED_TRANSITION)
        if data_at + dsize > end:
            if not live:  # a dead record with a bad length ends edk2's walk too
                break
            raise VarstoreError(f"{name}: damaged varstore: variable record at 0x{pos:x} runs past the store end")
        if live:
            try:
                var_name = str(ucs16.from_ucs16(data[name_at:data_at]))
            except UnicodeDecodeError:
                raise VarstoreError(f"{name}: damaged varstore: bad variable name at 0x{pos:x}") from None
            guid = str(guids.parse_bin(guid_le, 0))
            var = _RawVar(var_name, guid, attr, bytes(data[data_at : data_at + dsize]), count, pkidx, raw_time)
            key = f"{var_name}\0{guid}"
            (added if state == _VAR_ADDED else in_transition)[key] = var
        pos = next_pos
    for key, var in in_transition.items():
        added.setdefault(key, var)
    return dict(sorted(added.items()))


def _public(records: dict[str, _RawVar]) -> dict[str, EfiVariable]:
    out = {}
    for var in records.values():
        pub = var.public()
        out[pub.key] = pub
    return out


def _render(parsed: _Parsed, records: dict[str, _RawVar], template_name: str, src_name: str) -> bytes:
    """Bytes of `parsed`'s store holding exactly `records`, or VarstoreError if they do not fit."""
    store = parsed.store
    need = sum(len(store.bytes_var(v)) for v in records.values())
    room = store.end - store.start
    if need > room:
        raise VarstoreError(
            f"variables of {src_name} need {need} bytes, but {template_name} has room for only {room} "
            f"({parsed.layout.describe()})"
        )
    try:
        varlist = store.bytes_varlist(records)
    except SystemExit:  # the library's own "varstore is too small" check
        raise VarstoreError(f"variables of {src_name} do not fit into {template_name}") from None
    # What Edk2VarStore.bytes_varstore does, minus its byte-at-a-time padding loop
    # (quadratic: over a second for a 4 MiB store).
    data = store.filedata
    blob = data[: store.start] + varlist + b"\xff" * (store.end - store.start - len(varlist)) + data[store.end :]
    if len(blob) != len(store.filedata):
        raise VarstoreError(
            f"{template_name}: virt-firmware produced {len(blob)} bytes instead of {len(store.filedata)}"
        )
    return blob


def is_flash_size(n: int) -> bool:
    """A whole flash device: a power of two of at least 1 MiB (OVMF 1/2/4 MiB, AAVMF 64 MiB)."""
    return n >= 1 << 20 and n & (n - 1) == 0


def is_erased(data: bytes, start: int = 0) -> bool:
    """Whether `data[start:]` is erased flash: all 0x00 (what Debian's AAVMF images are padded
    with) or all 0xff (what erased NOR flash reads as)."""
    n = len(data) - start
    return n > 0 and data[start] in (0, 0xFF) and data.count(data[start], start) == n


PADDED_BANK = 64 << 20
"""The flash bank a padded varstore fills: QEMU's `virt` machine (AAVMF). x86 OVMF varstores
fill their range exactly, so an x86 varstore with zeros after it stays "oversized"."""


def is_padded_size(size: int, volume_end: int) -> bool:
    return size == PADDED_BANK and size > volume_end


def is_padded(data: bytes, volume_end: int) -> bool:
    """A varstore padded to its flash bank (AAVMF: a 768 KiB NvData volume, then erased bytes
    up to the 64 MiB a QEMU `virt` flash bank must be). The padding belongs to the varstore
    file (QEMU refuses a smaller one), so its layout size is the file's; a varstore followed
    by anything else (a unified image's code, junk) is not padded."""
    return is_padded_size(len(data), volume_end) and is_erased(data, volume_end)


def is_blank_flash(data: bytes) -> bool:
    """A flash image that is all erased: ArmVirtQemu formats such a varstore at its first boot
    (Debian 12's `AAVMF_VARS.fd` is 64 MiB of zeros)."""
    return is_flash_size(len(data)) and is_erased(data)


def layout_of_bytes(data: bytes, name: str) -> VarstoreLayout:
    """Layout of the varstore at the start of `data` (read from the file called `name`)."""
    return _parse(data, name).layout


_HEAD = 1 << 20  # where a varstore's NvData volume header must start (OVMF, AAVMF: at 0)


def read_layout(path: str) -> VarstoreLayout:
    """Layout of the varstore at the start of `path` (a varstore or unified image).

    For a unified image, `size` is the varstore part only: the end of the NvData
    firmware volume that holds the variables (in OVMF its length covers variables,
    FTW working block and spare: 0x20000 for 2 MiB builds, 0x84000 for 4 MiB ones).
    Only the volume is read (found in the first MiB, then read to its end): a 200 MB
    file costs what its varstore does, and a file larger than any firmware file is
    refused before anything is read.
    """
    try:
        head = fsio.read_head(path, _HEAD)
        offset = _find_nvdata(head)
        if offset is None or offset + 40 > len(head):
            return layout_of_bytes(head, path)  # raises, saying why
        (vlen,) = struct.unpack_from("<Q", head, offset + 32)
        end = offset + vlen
        volume = head[:end] if end <= len(head) else fsio.read_head(path, min(end, fsio.DEFAULT_MAX_READ))
        layout = layout_of_bytes(volume, path)
        size = os.stat(path).st_size
        if layout.size == end and is_padded_size(size, end) and size <= fsio.DEFAULT_MAX_READ \
                and fsio.erased_from(path, end):
            layout = VarstoreLayout(size=size, start=layout.start, end=layout.end)  # padded (AAVMF), streamed
    except OSError as exc:
        raise VarstoreError(f"{path}: {exc.strerror}") from None
    except fsio.ReadError as exc:
        raise VarstoreError(str(exc)) from None
    return layout


def variables_of_bytes(data: bytes, name: str) -> dict[str, EfiVariable]:
    """Live variables of the varstore at the start of `data`, keyed "<guid>:<name>"."""
    return _public(_parse(data, name).records)


def migrate_variables(src_path: str, template_path: str, *, template_length: int | None = None) -> bytes:
    """A fresh copy of the template holding every variable of `src_path`, as bytes.

    This is how a 2 MiB varstore moves to the 4 MiB layout without losing boot
    entries or enrolled keys. Every variable record is carried over byte for byte;
    the result is re-read and compared before it is returned. `template_length`
    takes only the leading varstore of a unified image as the template.
    """
    src = _parse(_read(src_path, None), src_path)
    template = _parse(_read(template_path, template_length), template_path)
    blob = _render(template, src.records, template_path, src_path)
    check = _parse(blob, f"migrated copy of {src_path}")
    if check.layout != template.layout or _records_bytes(check) != _records_bytes(src):
        raise VarstoreError(f"migrating {src_path} into {template_path} did not preserve every variable")
    return blob


def _records_bytes(parsed: _Parsed) -> dict[str, bytes]:
    return {key: parsed.store.bytes_var(var) for key, var in parsed.records.items()}


def with_variables(path: str, variables: Iterable[EfiVariable], *, length: int | None = None) -> bytes:
    """Bytes of the varstore `path` with `variables` added or replaced (the file is not touched).

    Existing variables keep their monotonic count and timestamp; new ones get zeros.
    Meant for tests and tools that need a varstore with non-default content.
    """
    parsed = _parse(_read(path, length), path)
    records = dict(parsed.records)
    for v in variables:
        try:
            guid = str(guids.parse_str(v.guid))
        except ValueError:
            raise VarstoreError(f"{v.guid!r}: not a GUID (variable {v.name})") from None
        key = f"{v.name}\0{guid}"
        old = records.get(key)
        count, pkidx, raw_time = (old.count, old.pkidx, old.raw_time) if old else (0, 0, bytes(16))
        records[key] = _RawVar(v.name, guid, v.attr, bytes(v.data), count, pkidx, raw_time)
    return _render(parsed, dict(sorted(records.items())), path, path)


def with_variable(path: str, name: str, guid: str, data: bytes, attr: int = ATTR_NV_BS_RT) -> bytes:
    """Bytes of the varstore `path` with one variable set (e.g. BootOrder, or a vendor test variable)."""
    return with_variables(path, [EfiVariable(name=name, guid=guid, attr=attr, data=data)])


# -- Secure Boot keys ------------------------------------------------------------------
#
# Signature lists are decoded and encoded here rather than with the library's
# EfiSigList/EfiSigDB: their API differs between virt-firmware 24.11 (Debian 13) and
# 26.x (PyPI), and the format (UEFI 2.10, 32.4.1) is small. Only the certificates
# themselves and the PCR7 measurement come from the library.

_SIGLIST = struct.Struct("<16sLLL")
_EFI_TIME = struct.Struct("<HBBBBBxLhBx")
_X509 = guids.EfiCertX509
_GLOBAL = guids.EfiGlobalVariable
_IMAGE_DB = guids.EfiImageSecurityDatabase
_SB_KEYS = {"PK": _GLOBAL, "KEK": _GLOBAL, "db": _IMAGE_DB, "dbx": _IMAGE_DB}
_SHIPPED_ATTR = {  # virt-firmware's names for the 2023 certificates, both versions
    "Microsoft Corporation KEK 2K CA 2023": "MS_KEK_2023",
    "Windows UEFI CA 2023": "MS_WIN_2023",
    "Microsoft UEFI CA 2023": "MS_3RD_2023",
    "Microsoft Option ROM UEFI CA 2023": "MS_ROM_2023",
}


@dataclass(frozen=True)
class _Sig:
    type_guid: str
    owner: str
    data: bytes


def _signatures(data: bytes, what: str) -> list[_Sig]:
    """Every signature in an EFI_SIGNATURE_LIST sequence (a PK/KEK/db/dbx value)."""
    out: list[_Sig] = []
    pos = 0
    while pos < len(data):
        if pos + _SIGLIST.size > len(data):
            raise VarstoreError(f"{what}: truncated signature list at byte {pos}")
        type_le, lsize, hsize, ssize = _SIGLIST.unpack_from(data, pos)
        if lsize < _SIGLIST.size + hsize or pos + lsize > len(data) or ssize < 16:
            raise VarstoreError(f"{what}: damaged signature list at byte {pos}")
        type_guid = str(guids.parse_bin(type_le, 0))
        sig = pos + _SIGLIST.size + hsize
        while sig + ssize <= pos + lsize:
            out.append(_Sig(type_guid, str(guids.parse_bin(data, sig)), bytes(data[sig + 16 : sig + ssize])))
            sig += ssize
        pos += lsize
    return out


def _x509_siglist(owner: str, der: bytes) -> bytes:
    return _SIGLIST.pack(guids.parse_str(_X509).bytes_le, _SIGLIST.size + 16 + len(der), 0, 16 + len(der)) + \
        guids.parse_str(owner).bytes_le + der


def _certificate(sig: _Sig, what: str) -> Certificate:
    try:
        cert = x509.load_der_x509_certificate(sig.data)
    except ValueError:
        raise VarstoreError(f"{what}: an X.509 entry (owner {sig.owner}) is not a certificate") from None
    cns = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    subject = str(cns[0].value) if cns else cert.subject.rfc4514_string()
    try:
        not_after = cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42 (Debian 12's 38)
        not_after = cert.not_valid_after.replace(tzinfo=UTC)
    return Certificate(subject=subject, owner=sig.owner, not_after=not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       sha256=hashlib.sha256(sig.data).hexdigest())


def _not_before(der: bytes) -> datetime:
    cert = x509.load_der_x509_certificate(der)
    try:
        return cert.not_valid_before_utc
    except AttributeError:
        return cert.not_valid_before.replace(tzinfo=UTC)


def secure_boot_vars(variables: Mapping[str, EfiVariable], name: str) -> SecureBootVars:
    """The Secure Boot keys and switches among a store's variables (see SecureBootVars)."""

    def value(var: str, guid: str) -> bytes | None:
        v = variables.get(f"{guid}:{var}")
        return v.data if v is not None else None

    def certs(var: str) -> tuple[tuple[Certificate, ...], int]:
        data = value(var, _SB_KEYS[var])
        if not data:
            return (), 0
        sigs = _signatures(data, f"{name}: {var}")
        x509s = tuple(_certificate(s, f"{name}: {var}") for s in sigs if s.type_guid == _X509)
        return x509s, len(sigs) - len(x509s)

    def flag(var: str, guid: str) -> bool | None:
        data = value(var, guid)
        return None if not data else data[0] != 0

    pk, _ = certs("PK")
    kek, _ = certs("KEK")
    db, db_hashes = certs("db")
    dbx_data = value("dbx", _IMAGE_DB)
    return SecureBootVars(
        pk=pk, kek=kek, db=db, db_hashes=db_hashes,
        dbx_entries=len(_signatures(dbx_data, f"{name}: dbx")) if dbx_data else 0,
        secure_boot_enable=flag("SecureBootEnable", guids.EfiSecureBootEnableDisable),
        custom_mode=flag("CustomMode", guids.EfiCustomModeEnable),
        secure_boot=flag("SecureBoot", _GLOBAL),
    )


def secure_boot_vars_of_bytes(data: bytes, name: str) -> SecureBootVars:
    return secure_boot_vars(variables_of_bytes(data, name), name)


def library_version() -> str:
    """The installed virt-firmware's version, for messages about what it can do."""
    try:
        return importlib.metadata.version("virt-firmware")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def ms2023_certificates() -> tuple[ShippedCert, ...]:
    """The Microsoft 2023 certificates the installed virt-firmware ships, each or None.

    26.x names them `certs.MS_KEK_2023 = 'microsoft.com/ms-kek-2023'` (a resource
    for `certs.load_cert`); 24.11 names them by file path
    (`certs/MicrosoftCorporationKEK2KCA2023.pem`) and has no Option ROM CA. A file
    whose subject is not the one expected is not used: varsd never guesses.
    """

    out = []
    for want in MS_2023_CERTS:
        ref = getattr(vf_certs, _SHIPPED_ATTR[want.subject], None)
        der = source = None
        if isinstance(ref, str):
            try:
                if os.path.isabs(ref):
                    pem, source = fsio.read_file(ref), ref
                else:
                    pem, source = vf_certs.load_cert(ref), f"virt.firmware certs/{ref}.pem"
                cert = (x509.load_pem_x509_certificate(pem) if b"-----BEGIN" in pem
                        else x509.load_der_x509_certificate(pem))
                cns = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
                if cns and cns[0].value == want.subject:
                    der = cert.public_bytes(serialization.Encoding.DER)
                else:
                    log.warning("virt-firmware's %s is not '%s'; not used", source, want.subject)
            except (OSError, fsio.ReadError, ValueError, AttributeError) as exc:
                log.warning("virt-firmware's copy of '%s' cannot be loaded: %s", want.subject, exc)
        out.append(ShippedCert(cert=want, der=der, sha256=hashlib.sha256(der).hexdigest() if der else None,
                               source=source if der else None))
    return tuple(out)


def _efi_time(raw: bytes) -> datetime | None:
    year, month, day, hour, minute, second, ns, _tz, _dl = _EFI_TIME.unpack(raw)
    if not year:
        return None
    try:
        return datetime(year, month, day, hour, minute, second, ns // 1000, tzinfo=UTC)
    except ValueError:
        return None


def _efi_time_bytes(ts: datetime) -> bytes:
    return _EFI_TIME.pack(ts.year, ts.month, ts.day, ts.hour, ts.minute, ts.second, ts.microsecond * 1000, 0, 0)


def with_certificates(data: bytes, name: str, add: Iterable[ShippedCert]) -> bytes:
    """Bytes of the varstore `data` with certificates appended to KEK/db (the input is not changed).

    Every other variable is carried over byte for byte, and nothing is removed: the
    2011 certificates stay (DBX updates are still signed with the 2011 KEK). The
    certificates go under Microsoft's owner GUID, as edk2 and virt-firmware enroll
    them; a certificate already present is skipped. The time stamp of an authenticated
    variable becomes the newest certificate's not-before if that is later, as
    virt-firmware does. The result is re-read and checked before it is returned.
    """
    parsed = _parse(data, name)
    records = dict(parsed.records)
    changed: dict[str, bytes] = {}
    for shipped in add:
        if shipped.der is None:
            raise VarstoreError(f"virt-firmware {library_version()} does not ship '{shipped.cert.subject}'")
        var = shipped.cert.variable
        key = f"{var}\0{_SB_KEYS[var]}"
        old = records.get(key)
        if old is None:
            raise VarstoreError(f"{name}: has no {var} variable; varsd adds to enrolled keys only")
        if any(s.type_guid == _X509 and s.data == shipped.der for s in _signatures(old.data, f"{name}: {var}")):
            continue
        stamp = _efi_time(old.raw_time)
        newest = _not_before(shipped.der)
        raw_time = _efi_time_bytes(newest) if stamp is None or stamp < newest else old.raw_time
        records[key] = _RawVar(var, str(old.guid), old.attr, old.data + _x509_siglist(MICROSOFT_OWNER, shipped.der),
                               old.count, old.pkidx, raw_time)
        changed[key] = old.data
    blob = _render(parsed, records, name, name)
    check = _parse(blob, f"updated copy of {name}")
    if check.layout != parsed.layout or check.records.keys() != parsed.records.keys():
        raise VarstoreError(f"{name}: adding certificates changed the store's layout or variable set")
    before, after = _records_bytes(parsed), _records_bytes(check)
    for key in parsed.records:
        if key in changed:
            if not check.records[key].data.startswith(changed[key]):
                raise VarstoreError(f"{name}: adding certificates altered what {key.split(chr(0))[0]} held")
        elif before[key] != after[key]:
            raise VarstoreError(f"{name}: adding certificates altered variable {key.split(chr(0))[0]}")
    return blob


def predict_pcr7(before: bytes, after: bytes, name: str) -> Pcr7:
    """PCR7 (sha256) with Secure Boot on, for the store before and after a change.

    Uses virt-firmware's measurement module (26.x: `virt.firmware.measure`); where the
    installed version has none, says so and predicts nothing.
    """
    try:
        from virt.firmware import measure
    except ImportError:
        return Pcr7(None, None, f"virt-firmware {library_version()} has no measurement module "
                                "(virt.firmware.measure); PCR7 cannot be predicted, assume it changes")

    def pcr7(data: bytes, what: str) -> str:
        records = _parse(data, what).records
        varlist = {str(v.name): v for v in records.values() if _SB_KEYS.get(str(v.name)) == str(v.guid)}
        try:
            events = measure.measure_varlist(["sha256"], varlist, secureboot=True, shim=False)
            values = measure.calculate_pcrs(["sha256"], events)
        except Exception as exc:  # the library's own failure, reported not raised
            raise VarstoreError(f"{what}: virt-firmware could not measure it: {exc}") from None
        return next(v["digest"] for v in values if v["pcr"] == 7)

    try:
        return Pcr7(pcr7(before, name), pcr7(after, f"updated copy of {name}"))
    except VarstoreError as exc:
        return Pcr7(None, None, str(exc))


# -- describing variables (varsctl backup diff) -----------------------------------------

_BOOT_OPTION = ("Boot", "Driver", "SysPrep", "PlatformRecovery")
_SIGNATURE_DBS = ("PK", "KEK", "db", "dbx", "dbr", "dbt", "MokList", "MokListX", "MokListTrusted")


def describe_variable(var: EfiVariable) -> str:
    """A variable's value in admin terms: boot entries decoded (title, device path),
    BootOrder as a list, signature databases as certificate subjects and hash counts,
    small values in hex. Never raises: undecodable data is shown as its size and digest."""
    name = var.name
    try:
        if name in ("BootOrder", "DriverOrder") and len(var.data) % 2 == 0:
            return "[" + ", ".join(f"Boot{n:04X}" if name == "BootOrder" else f"Driver{n:04X}"
                                   for n in struct.unpack(f"<{len(var.data) // 2}H", var.data)) + "]"
        if name in ("BootNext", "BootCurrent") and len(var.data) == 2:
            return f"Boot{struct.unpack('<H', var.data)[0]:04X}"
        if any(name.startswith(p) and len(name) == len(p) + 4 for p in _BOOT_OPTION):
            entry = bootentry.BootEntry(data=var.data)
            return f"title={str(entry.title)!r} path={entry.devicepath}"
        if name in ("ConIn", "ConOut", "ErrOut", "ConInDev", "ConOutDev", "ErrOutDev"):
            return str(devpath.DevicePath(var.data))
        if name in ("Lang", "PlatformLang", "PlatformLangCodes", "LangCodes"):
            return repr(var.data.rstrip(b"\0").decode("ascii"))
        if name in _SIGNATURE_DBS:
            return "; ".join(signature_summary(var.data)) or "empty"
    except Exception as exc:  # noqa: BLE001 - the library raises anything on odd data
        log.debug("cannot decode %s: %s", var.key, exc)
    if len(var.data) <= 16:
        return var.data.hex() or "(empty)"
    return f"{len(var.data)} bytes, sha256 {fsio.sha256_bytes(var.data)[:16]}"


def signature_summary(data: bytes) -> list[str]:
    """Entries of an EFI signature database: 'cert CN=...' per certificate, 'N x <type>' per run of others.

    Decoded by this module's own signature-list parser (the one `secure_boot_vars` uses)."""
    out: list[str] = []
    for type_guid, group in itertools.groupby(_signatures(data, "signature database"), key=lambda g: g.type_guid):
        sigs = list(group)
        if type_guid != _X509:
            out.append(f"{len(sigs)} x {guids.name(guids.parse_str(type_guid))}")
            continue
        for sig in sigs:
            try:
                out.append(f"cert {x509.load_der_x509_certificate(sig.data).subject.rfc4514_string()}")
            except ValueError:
                out.append("cert (undecodable)")
    return out


def code_modules(data: bytes, name: str) -> frozenset[str]:
    """Names of the edk2 modules in a firmware code image (its firmware volumes, decompressed),
    read with virt-firmware's volume parser: what a build *is*, whatever its file is called."""
    try:
        from virt.firmware import dump
    except ImportError as exc:  # older virt-firmware without the volume parser
        raise VarstoreError(f"{name}: this virt-firmware cannot read firmware volumes ({exc})") from None
    names: set[str] = set()

    def walk(item: Any, depth: int = 0) -> None:
        if depth > 64:
            return
        if getattr(item, "typeid", None) == 0x15 and getattr(item, "blob", None):  # user-interface section
            names.add(str(ucs16.from_ucs16(item.blob, 0)).rstrip("\0"))
        if isinstance(item, list | tuple) or hasattr(item, "data") and isinstance(item.data, list):
            for child in item:
                if not isinstance(child, str | bytes | int):
                    walk(child, depth + 1)

    try:
        walk(dump.Edk2Image(name, data))
    except (Exception, SystemExit) as exc:
        raise VarstoreError(f"{name}: not a firmware image virt-firmware can read ({exc})") from None
    return frozenset(names)
