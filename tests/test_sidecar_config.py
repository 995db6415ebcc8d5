"""The sidecar's configuration: every mistake is a clear ConfigError, and nothing starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tenure import cli
from tenure.sidecar.config import load_config, parse_config
from tenure.errors import ConfigError

from support import PG_BIN


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    d = tmp_path / "pgdata"
    d.mkdir()
    (d / "PG_VERSION").write_text("15\n")
    return str(d)


def base(data_dir: str, **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "service": "db", "member": "db1",
        "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
        "postgres": {"data_dir": data_dir, "port": 5432, "bin_dir": PG_BIN, "guard_schema": "public"},
    }
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        target = cfg[section] if section else cfg
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    return cfg


def test_a_good_config(data_dir: str) -> None:
    cfg = parse_config(base(data_dir, ttl=5, postgres__synchronous=True, listen="0.0.0.0:9000"))
    assert (cfg.ttl, cfg.postgres.synchronous, cfg.http_address) == (5, True, ("0.0.0.0", 9000))
    assert cfg.postgres.guard_databases == ["postgres"]
    app = parse_config(base(data_dir, postgres__advertise_dsn="host=db1 dbname=openlibrary"))
    assert app.postgres.guard_databases == ["openlibrary"]


@pytest.mark.parametrize("changes, message", [
    ({"colour": "blue"}, "unknown key in \\[top level\\]: colour"),
    ({"postgres__datadir": "/x"}, "unknown key in \\[postgres\\]: datadir"),
    ({"etcd__endpoint": "x"}, "unknown key in \\[etcd\\]: endpoint"),
    ({"member": None}, "missing key in \\[top level\\]: member"),
    ({"ttl": "2"}, "ttl must be int"),
    ({"ttl": 0}, "ttl must be whole seconds"),
    ({"nofailover": "yes"}, "nofailover must be bool"),
    ({"service": "a/b"}, "invalid service name"),
    ({"listen": "8008"}, "listen must be 'host:port'"),
    ({"etcd__endpoints": ["localhost:2379"]}, "malformed etcd endpoint"),
    ({"postgres__data_dir": "/nonexistent"}, "not a PostgreSQL data directory"),
    ({"postgres__bin_dir": "/usr/bin"}, "has no pg_ctl"),
    ({"postgres__port": 70000}, "port must be 1-65535"),
    ({"postgres__advertise_dsn": "host=db1 colour=blue"}, "not a valid libpq connection string"),
    ({"postgres__advertise_dsn": "port=5432"}, "names no host"),
    ({"postgres__guard_schema": None}, "neither guard_schema nor guard_tables"),
    ({"postgres__advertise_dsn": "host=db1 password=s3cret"}, "advertise_dsn holds a password"),
    ({"postgres__advertise_dsn": "host=db1 dbname=openlibrary", "postgres__guard_databases": ["postgres"]},
     "leaves the application's database 'openlibrary'"),
    ({"postgres__guard_tables": "items"}, "guard_tables must be list"),
])
def test_mistakes_are_named(data_dir: str, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(base(data_dir, **changes))
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match=message):
        parse_config(base(data_dir, **changes))


def test_a_file_that_is_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("service = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    assert cli.main(["sidecar", "--config", str(bad)]) == 2
    assert "ConfigError" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.toml"))


def test_the_shipped_example_parses_apart_from_its_paths(tmp_path: Path, data_dir: str) -> None:
    example = Path(__file__).parent.parent / "examples" / "sidecar-postgres.toml"
    text = example.read_text().replace("/var/lib/postgresql/15/main", data_dir)
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.service == "db" and cfg.postgres.guard_schema == "public"
    assert os.path.samefile(cfg.postgres.data_dir, data_dir)
