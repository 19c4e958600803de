"""What a varsd or varsctl exit code means; the same for every command (README: exit codes)."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0  # done, all fine
    ATTENTION = 1  # something needs an admin: a domain in error or needs-migration, a refused or failed action
    USAGE = 2  # could not run: usage, configuration or connection error
