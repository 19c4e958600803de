"""Reading a varstore's variables, for tests that check nothing was lost."""

from __future__ import annotations

from varsd.adapters import fsio, virtfw
from varsd.errors import VarstoreError
from varsd.model.varstore import EfiVariable


def read_variables(path: str, length: int | None = None) -> dict[str, EfiVariable]:
    """Live variables of the varstore `path` (only its first `length` bytes if given);
    an unreadable or short file is a VarstoreError, as in the adapter's own readers."""
    try:
        data = fsio.read_file(path) if length is None else fsio.read_prefix(path, length, follow_symlinks=True)
    except fsio.ReadError as exc:
        raise VarstoreError(str(exc)) from None
    return virtfw.variables_of_bytes(data, path)
