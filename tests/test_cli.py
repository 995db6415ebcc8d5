"""The tenure command: status, history, and the README's demo."""

from __future__ import annotations

import io
import json

import pytest

import tenure
from tenure import cli
from tenure.lab import demo


def test_status_and_history(etcd, client: tenure.Client, service: str, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    endpoints = ",".join(etcd.endpoints)
    election = tenure.Election(client, service, member="db1", value={"dsn": "host=db1"})
    first = election.campaign(timeout=5)
    first.resign()
    second = election.campaign(timeout=5)

    assert cli.main(["--endpoints", endpoints, "status", service]) == 0
    out = capsys.readouterr().out
    assert f"verdict: OK: db1 leads (token {second.token})" in out
    assert any(line.split()[:2] == ["db1", "leader"] and str(second.token) in line.split() for line in out.splitlines())

    assert cli.main(["--endpoints", endpoints, "status", service, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["services"][0]["leader"]["token"] == second.token
    assert report["services"][0]["primary"] == "db1"

    assert cli.main(["--endpoints", endpoints, "history", service, "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [h["token"] for h in history] == [first.token, second.token]
    assert history[0]["reason"] == "resigned" and history[1]["end"] is None

    second.resign()
    assert cli.main(["--endpoints", endpoints, "status", service]) == 3  # no leader: non-zero for scripts
    assert "NO PRIMARY" in capsys.readouterr().out
    election.close()


def test_cli_reports_bad_endpoint_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--endpoints", "localhost:2379", "status"]) == 2
    assert "ConfigError: malformed etcd endpoint 'localhost:2379'" in capsys.readouterr().err


def test_user_mistakes_are_one_line_without_traceback(etcd, service: str,  # type: ignore[no-untyped-def]
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    endpoints = ",".join(etcd.endpoints)
    for argv, text in ((["status", "no such"], "invalid service name"),
                       (["history", "nosuch-svc"], "has no keys"),
                       (["pause", "nosuch-svc"], "has no keys"),
                       (["switchover", "nosuch-svc"], "has no keys"),
                       (["switchover", service, "--at", "tomorrow-ish"], "--at"),
                       (["restart", "nosuch-member"], "no live member")):
        assert cli.main(["--endpoints", endpoints, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_election_demo_runs_end_to_end() -> None:
    out = io.StringIO()
    assert demo.run(ttl=2, out=out, election=True) == 0, out.getvalue()
    text = out.getvalue()
    assert "tokens strictly increased: True; deposed leader fenced: True" in text
    assert "is_valid() = False" in text


def test_pg_guard_commands(postgres, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS cli_guarded (x int)")
    assert cli.main(["pg", "install-guard", "--dsn", postgres.dsn, "--table", "public.cli_guarded"]) == 0
    assert '"installed": true' in capsys.readouterr().out
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("INSERT INTO cli_guarded VALUES (1)")  # no lease yet: refused, fail safe
        assert info.value.sqlstate == "25006"
    assert cli.main(["pg", "remove-guard", "--dsn", postgres.dsn, "--table", "public.cli_guarded"]) == 0
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO cli_guarded VALUES (1)")
    assert cli.main(["pg", "install-guard", "--dsn", postgres.dsn, "--table", "public.no_such_table"]) == 2
    assert "no_such_table" in capsys.readouterr().err
    assert cli.main(["pg", "install-guard", "--dsn", postgres.dsn]) == 2
