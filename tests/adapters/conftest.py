"""Tier 1/2, the edges one by one: the filesystem (real files, tmpfs mounts), virt-firmware
(Debian's real varstores), the journal (a real SQLite file) and libvirt (the in-process
`test:///default` driver). No libvirtd, no QEMU."""
