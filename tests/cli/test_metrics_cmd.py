"""varsctl metrics on the test:/// driver: the text parses with prometheus_client and says what status says."""

from __future__ import annotations

import json

from metrics_check import assert_matches
from metrics_check import samples as parse_samples

from varsd.cli.varsctl import main

from .test_secureboot_cmd import (
    OLD,
    fleet,  # noqa: F401  (the fixture)
)


def test_metrics_match_status_and_secureboot_status(fleet, capsys, tmp_path):  # noqa: F811
    base = fleet["base"]
    assert main([*base, "metrics"]) == 0
    samples = parse_samples(capsys.readouterr().out)
    main([*base, "status", "--json"])
    status = json.loads(capsys.readouterr().out)["domains"]
    main([*base, "secureboot", "status", "--json"])
    sb = json.loads(capsys.readouterr().out)
    assert_matches(samples, status, sb)
    assert samples[("varsd_domains_vtpm", ())] == 1
    with_store = sum(1 for d in sb["domains"] if d["varstore"])
    assert samples[("varsd_backups_missing", ())] == with_store  # nothing backed up yet

    # After an update, that domain has a backup (the one taken before the write) and is ok.
    assert main([*base, "secureboot", "update", "b"]) == 0
    capsys.readouterr()
    out = tmp_path / "varsd.prom"
    assert main([*base, "metrics", "--textfile", str(out)]) == 0
    samples = parse_samples(out.read_text())
    assert samples[("varsd_backups_missing", ())] == with_store - 1
    assert 0 <= samples[("varsd_backup_age_seconds", (("domain", "b"),))] < 60
    # 24.11 ships no Option ROM CA: the updated store stays update-available (and says why)
    assert samples[("varsd_domains_ms2023", (("ms2023", "ok"),))] == (0 if OLD else 1)
