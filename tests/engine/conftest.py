"""Tier 2, the shell on libvirt's in-process `test:///default` driver: real files, real
varstores, real locks and journal; no libvirtd, no QEMU (that is tests/integration)."""
