"""The [solr] section of a sidecar config: parsed, and bad input refused with a clear error."""

from __future__ import annotations

import pytest

from tenure.errors import ConfigError
from tenure.sidecar.config import parse_config

BASE = {"service": "search", "member": "s1", "etcd": {"endpoints": ["http://127.0.0.1:2379"]}}


def test_solr_section_parses() -> None:
    cfg = parse_config({**BASE, "solr": {"base_url": "http://127.0.0.1:8983/solr", "core": "ol"}})
    assert cfg.postgres is None and cfg.solr is not None and cfg.solr.core == "ol"


@pytest.mark.parametrize("solr, match", [
    ({"base_url": "ftp://x/solr"}, "base_url must be an http"),
    ({"base_url": "http://h/solr", "poll_interval": 0}, "must be > 0"),
    ({"base_url": "http://h/solr", "max_lag_generations": -1}, "max_lag_generations"),
    ({"base_url": "http://h/solr", "colour": "blue"}, "colour"),
])
def test_bad_solr_sections(solr: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({**BASE, "solr": solr})


def test_one_service_per_sidecar() -> None:
    with pytest.raises(ConfigError, match="not both"):
        parse_config({**BASE, "solr": {"base_url": "http://h/solr"}, "postgres": {"data_dir": "/x"}})
