"""Tier 3, the systemd unit checked by the real `systemd-analyze` (installed by
scripts/host-setup); a host without it fails these tests rather than skipping them."""
