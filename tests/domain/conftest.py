"""Tier 1, pure tables: domain XML in, typed records and rewritten XML out. No libvirt at
all, no files but Debian's OVMF images the classifier looks at."""
