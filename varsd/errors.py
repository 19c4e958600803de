"""One error hierarchy for varsd: every failure an admin sees is a VarsdError.

Messages name the domain or file involved and say what to do; adapters convert
library errors (libvirt, virt-firmware, OSError) into these at their boundary.
"""

from __future__ import annotations


class VarsdError(Exception):
    """Base of every error varsd reports."""


class ConfigError(VarsdError):
    """The configuration file is unreadable or contains something invalid."""


class DescriptorError(VarsdError):
    """A QEMU firmware descriptor is malformed or points at missing files."""


class VarstoreError(VarsdError):
    """A file is not a usable edk2 varstore, or variables do not fit."""


class ProvisionError(VarsdError):
    """A varstore could not be created; nothing was left half-written."""


class DomainXMLError(VarsdError):
    """A domain's XML could not be parsed or rewritten."""


class HypervisorError(VarsdError):
    """libvirt failed. `retryable` is True when trying again later may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class LockBusy(VarsdError):
    """Another varsd actor holds the lock (a domain's, or the firmware archive's)."""
