"""The varstore index's file identity: the fast path (one realpath() per directory) agrees
with realpath() for every spelling of a name."""

from __future__ import annotations

import os

from varsd.engine.varstore_users import _identity


def test_fast_identity_agrees_with_realpath(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    (tmp_path / "dirlink").symlink_to(real_dir)
    (real_dir / "a_VARS.fd").write_bytes(b"x")
    (real_dir / "b_VARS.fd").symlink_to(real_dir / "a_VARS.fd")
    os.link(real_dir / "a_VARS.fd", real_dir / "hard_VARS.fd")
    (real_dir / "dangling_VARS.fd").symlink_to(tmp_path / "nowhere")
    (real_dir / "sub").mkdir()
    names = ["a_VARS.fd", "b_VARS.fd", "hard_VARS.fd", "dangling_VARS.fd", "missing_VARS.fd",
             "sub/../a_VARS.fd", "./a_VARS.fd"]
    paths = [str(d / n) for d in (real_dir, tmp_path / "dirlink") for n in names]
    paths.append(str(tmp_path / "dirlink") + "/../real/a_VARS.fd")
    dirs: dict[str, str] = {}
    for path in paths:
        assert _identity(path, dirs) == _identity(path), path
    assert _identity(str(real_dir / "hard_VARS.fd"), dirs)[1] == _identity(str(real_dir / "a_VARS.fd"), dirs)[1]
