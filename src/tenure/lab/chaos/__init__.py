"""Chaos runs: the whole stack in network namespaces, seeded faults, writers, a checker and a report.

* :mod:`~tenure.lab.chaos.stack` -- 3 etcd members, 3 PostgreSQL nodes with sidecars, memcached with
  registrars, one namespace per host;
* :mod:`~tenure.lab.chaos.faults` -- the seeded schedule and how each fault is made and healed;
* :mod:`~tenure.lab.chaos.workload` -- writers and readers through the web-tier router, recording every try;
* :mod:`~tenure.lab.chaos.checker` -- what the records prove (one writer, nothing lost, liveness, availability);
* :mod:`~tenure.lab.chaos.report` -- the markdown summary and the PNG timeline;
* :mod:`~tenure.lab.chaos.run` -- a whole run (``python -m tenure.lab.chaos.run``).
"""
