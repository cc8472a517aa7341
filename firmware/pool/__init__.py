"""Multi-device pools on etcd (issue 7, docs/pool.md).

::

    etcd.py        the etcd client: etcd3gw over the JSON gateway, fail-over across members,
                   transactions, leases, a watch stream that notices a dead member
    cluster.py     a local etcd cluster on loopback (``slicefab pool up``, tests, benches)
    model.py       the pool's records: a composition request, a device's capacity, a part
    placement.py   the placement algorithm and its cost function (and first-fit, the baseline)
    member.py      a device's pool membership: registration under a lease, programming its
                   reservations into its own fabric
    composer.py    the pool API: status, compose (one etcd transaction), release, lost parts
    cli.py         ``slicefab pool up|down|status|compose|release|list|show``
    bench.py       ``slicefab bench placement`` and ``slicefab bench pool``
"""
