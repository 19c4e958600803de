"""Tier 3 tests: real libvirtd, QEMU under TCG and Debian's OVMF (see conftest.py)."""
