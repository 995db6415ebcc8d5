"""The loop that runs beside one server and keeps it in its place, with its HTTP endpoints and config.

* :mod:`tenure.sidecar.loop` -- the service-agnostic loop: member record,
  eligibility and ranking, campaign, act on election and on loss;
* :mod:`tenure.sidecar.decide` -- what to do next, as a pure function of what
  the loop observed;
* :mod:`tenure.sidecar.policy` -- the protocol a kind of service implements
  (status, position, promote, demote, follow);
* :mod:`tenure.sidecar.postgres` -- the PostgreSQL policy;
* :mod:`tenure.sidecar.memcache` -- the memcached registrar (load-sharing: no
  election);
* :mod:`tenure.sidecar.http` -- ``/primary``, ``/replica``, ``/health``,
  ``/status``, ``/metrics`` for haproxy and Prometheus;
* :mod:`tenure.sidecar.config` -- the TOML configuration.
"""
