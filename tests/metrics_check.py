"""One check both metrics tests make: `varsctl metrics` says what `status` and `secureboot status` say.

Importable from any test module (pytest puts tests/ on the import path, like ovmf_files)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from varsd.model.domain import Status
from varsd.model.secureboot import Ms2023State


def samples(text: str) -> dict:
    """Prometheus text -> {(name, sorted label items): value}; parsing it is part of the check."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def assert_matches(got: dict, status: list[dict], sb: dict) -> None:
    for value in Status:
        assert got[("varsd_domains", (("status", value.value),))] == sum(d["status"] == value for d in status)
    for value in {d["config"] for d in status}:
        assert got[("varsd_domains_by_config", (("config", value),))] == sum(d["config"] == value for d in status)
    for value in Ms2023State:
        assert got[("varsd_domains_ms2023", (("ms2023", value.value),))] == \
            sum(d["ms2023"] == value for d in sb["domains"])
        assert got[("varsd_templates_ms2023", (("ms2023", value.value),))] == \
            sum(t["ms2023"] == value for t in sb["templates"])
