"""Tier 1, firmware facts: descriptors, the catalog and the archive over Debian's real
descriptor files and OVMF images (and copies in tmp_path); fit and selection as pure
tables. No libvirt."""
