"""A solr-updater in the shape of Open Library's: read a change log from an offset, post to the Solr leader.

Runs on several hosts at once; only one holds the ``solr-updater`` job (tenure.singleton). It

1. resumes from the last fenced checkpoint (the log offset) in etcd;
2. reads up to ``batch`` entries of the change log (one JSON document per line,
   standing in for infobase's log);
3. posts them, committed, to the current Solr leader, found through the router
   (``router.solr(solr_service).leader``), retrying ``retries`` times;
4. saves the new offset through the fence *only after the post succeeded*: a
   post that still fails after its retries leaves the offset where it was and
   is tried again (at least once: nothing is skipped, some documents may be
   posted twice, which Solr's ``id`` makes harmless).

A deposed updater (killed, paused past its ttl, cut off from etcd) stops at its
next check, and cannot move the offset: etcd refuses its write.

    python examples/solr_updater.py --config examples/solr_updater.toml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import tomllib
from typing import Any

import tenure
from tenure.errors import Fenced, NotLeader, ServiceError, TenureError
from tenure.services.solr import SolrNode
from tenure.singleton import singleton

log = logging.getLogger("solr_updater")


def read_entries(path: str, offset: int, limit: int) -> list[dict[str, Any]]:
    """Entries ``offset .. offset+limit`` of the log (complete lines only)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if len(out) >= limit or not line.endswith("\n"):
                break
            out.append(json.loads(line))
    return out


def post(url: str, docs: list[dict[str, Any]], retries: int, timeout: float) -> None:
    """Post ``docs`` with a commit; ServiceError once every retry failed."""
    for attempt in range(retries + 1):
        try:
            SolrNode.from_url(url, timeout=timeout).add(docs, commit=True)
            return
        except ServiceError as e:
            if attempt == retries:
                raise
            log.warning("post to %s failed (%s); retry %d/%d", url, e, attempt + 1, retries)
            time.sleep(0.1 * (attempt + 1))


def run(cfg: dict[str, Any]) -> int:
    u = cfg["updater"]
    client = tenure.connect(cfg["etcd"]["endpoints"])
    router = tenure.Router(client)
    solr = router.solr(u.get("solr_service", "search"))
    fixed_url = u.get("solr_url") or None  # a fixed leader URL (Open Library's OL_SOLR_BASE_URL), bypassing the router
    with singleton(client, u.get("job", "solr-updater"), member=u["member"], ttl=int(u.get("ttl", 2))) as job:
        cp = job.checkpoint("offset")
        offset = int(cp.get(default=0))
        log.info("running as %s (term %d) from offset %d", job.member, job.token, offset)
        while not job.stopped:
            entries = read_entries(u["log"], offset, int(u.get("batch", 100)))
            if not entries:
                job.wait(float(u.get("interval", 0.2)))
                continue
            url = fixed_url or solr.leader
            if url is None:
                job.wait(0.05)  # failover in progress: wait for the new leader, post nowhere
                continue
            end = offset + len(entries)
            try:
                with cp.covering(end):  # the offset moves only if the post below succeeded
                    post(url, entries, int(u.get("retries", 3)), float(u.get("timeout", 2.0)))
            except ServiceError as e:
                log.error("post of entries %d..%d failed after retries (%s); offset stays %d", offset, end - 1, e,
                          offset)
                job.wait(0.2)
                continue
            except (NotLeader, Fenced) as e:
                log.error("checkpoint refused: %s; stopping", e)
                break
            log.info("checkpoint %d (term %d, %s)", end, job.token, url)
            offset = end
        log.info("stopped: %s", "term ended" if job.stopped else "checkpoint refused")
    router.close()
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--member", help="override [updater] member")
    p.add_argument("--log", help="override [updater] log")
    p.add_argument("--endpoints", help="override [etcd] endpoints (comma-separated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        print(f"solr_updater: cannot read {args.config}: {e}", file=sys.stderr)
        return 2
    if args.member:
        cfg["updater"]["member"] = args.member
    if args.log:
        cfg["updater"]["log"] = args.log
    if args.endpoints:
        cfg["etcd"]["endpoints"] = args.endpoints.split(",")
    try:
        return run(cfg)
    except TenureError as e:
        print(f"solr_updater: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
