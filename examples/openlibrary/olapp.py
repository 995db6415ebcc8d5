"""A web.py application wired as Open Library wires its database, for both migration phases.

Its database objects are built once, at import, from ``db_parameters`` in a
YAML file (``OL_CONFIG``), as Open Library builds infogami's store and
``openlibrary.core.db`` from ``infobase.yml``/``openlibrary.yml``; web.py then
connects once per request. Run it under gunicorn sync workers::

    OL_CONFIG=openlibrary.phase1.yml gunicorn -w 3 -b 127.0.0.1:8080 --chdir examples/openlibrary olapp:application

* ``openlibrary.phase1.yml`` (no ``tenure`` section): plain ``web.database``
  objects pointing at haproxy's listeners; the only addition is
  :func:`tenure.web.webpy.unavailable_processor`, so that a database that is
  unreachable or read-only gives a 503 with Retry-After rather than a 500.
* ``openlibrary.phase2.yml`` (a ``tenure`` section): the same objects made by
  :func:`tenure.web.webpy.databases`, which route every connect through the
  router; :func:`tenure.web.webpy.wsgi` adds the processor, the read-only
  middleware (login allowed) and ``/health``.

Pages: ``GET /`` reads through ``read_db``; ``GET /recent`` reads through
``db``; ``POST /items?id=N`` writes through ``db``; ``POST /account/login``
only reads, through ``db``. Each answer names the server port that served it.
The table is the one tenure's test clusters create: ``items(id bigint primary
key, writer text, at float8)``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import web
import yaml

from tenure.web import webpy

web.config.debug = False
logging.basicConfig(level=os.environ.get("OL_LOG_LEVEL", "WARNING"),
                    format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")

with open(os.environ.get("OL_CONFIG", os.path.join(os.path.dirname(__file__), "openlibrary.phase1.yml"))) as f:
    config: dict[str, Any] = yaml.safe_load(f)


def db_parameters(key: str = "db_parameters") -> dict[str, Any]:
    """``web.database`` keywords from a ``db_parameters``-style table (``engine`` is web.py's ``dbn``)."""
    params = dict(config[key])
    params["dbn"] = params.pop("engine", "postgres")
    return params


if "tenure" in config:  # phase 2
    from tenure.web import Router

    router = Router.from_config(config, section="tenure")  # no etcd traffic until a worker reads it
    settings = webpy.web_settings(config, section="tenure")
    _dbs = webpy.databases(router, settings, **db_parameters())
    db, read_db = _dbs["db"], _dbs["read_db"]
else:  # phase 1
    db = web.database(**db_parameters())
    read_db = web.database(**db_parameters("read_db_parameters"))


def _port(database: Any) -> int:
    return int(database.query("SELECT inet_server_port() AS port")[0].port)


def _json(data: dict[str, Any]) -> str:
    web.header("Content-Type", "application/json")
    return json.dumps({**data, "pid": os.getpid(), "read_only": webpy.read_only()})


class Home:
    def GET(self) -> str:
        n = read_db.query("SELECT count(*) AS n FROM items")[0].n
        return _json({"items": n, "port": _port(read_db)})


class Recent:
    def GET(self) -> str:
        rows = list(db.select("items", what="max(id) AS id"))
        return _json({"last": rows[0].id if rows else None, "port": _port(db)})


class Items:
    def POST(self) -> str:
        i = web.input(id=None)
        with db.transaction():
            db.insert("items", id=int(i.id), writer=f"ol-{os.getpid()}", at=time.time(), seqname=False)
            port = _port(db)  # in the same transaction: the server that took the write
        return _json({"ok": True, "port": port})


class Login:
    def POST(self) -> str:
        n = db.query("SELECT count(*) AS n FROM items")[0].n  # a password check: a read
        return _json({"ok": True, "items": n, "port": _port(db)})


urls = ("/", "Home", "/recent", "Recent", "/items", "Items", "/account/login", "Login")
app = web.application(urls, globals(), autoreload=False)

if "tenure" in config:
    application = webpy.wsgi(app, router, settings)
else:
    app.add_processor(webpy.unavailable_processor(retry_after=5))
    application = app.wsgifunc()
