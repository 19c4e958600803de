"""Tier 3, packaging with the real tools: the dpkg trigger installed and fired by the real
dpkg, the RPM spec read as text. A missing dpkg fails, never skips."""
