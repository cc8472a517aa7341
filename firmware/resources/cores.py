"""Processing cores, grouped in clusters, allocated by id.

Cores are numbered globally in cluster order: cluster ``c``'s cores follow all cores of the
clusters before it. Cores of one cluster share a cache and a local interconnect, so a slice
that asks for ``same_cluster`` gets all its cores from one cluster, and the packing policy
keeps whole clusters free for such requests as long as it can (see
:meth:`CoreAllocator.allocate`).

Every mutating method validates its request and checks the current state first, and only
then changes anything: a call that raises leaves the allocator exactly as it was.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, TypeGuard

from firmware.errors import ConfigError, InsufficientResources, RequestError, ResourceConflict

__all__ = ["CoreAllocator"]


def _is_int(value: object) -> TypeGuard[int]:
    """True for a real ``int`` (``bool`` is an ``int`` subclass but never a core)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _insufficient(
    requested: int, available: int, explanation: str, **details: Any
) -> InsufficientResources:
    """An ``InsufficientResources("cores", ...)`` whose message also says *why*."""
    return InsufficientResources("cores", requested, available, "cores", explanation, **details)


class CoreAllocator:
    """Allocator of core ids over clusters of ``cluster_sizes[c]`` cores (all free at start).

    Raises:
        ConfigError: if there is no cluster, or a cluster size is not an int >= 1.
    """

    def __init__(self, cluster_sizes: Sequence[int]) -> None:
        sizes = tuple(cluster_sizes)
        if not sizes:
            raise ConfigError(
                "cores: the device needs at least one cluster",
                field="cores.clusters",
                expected=">= 1",
            )
        for cluster, size in enumerate(sizes):
            if not _is_int(size) or size < 1:
                raise ConfigError(
                    f"cores: cluster {cluster} has {size!r} cores; expected an int >= 1",
                    field="cores.clusters",
                    cluster=cluster,
                    value=size,
                    expected=">= 1",
                )
        self._sizes = sizes
        self._cluster_of: list[int] = [c for c, size in enumerate(sizes) for _ in range(size)]
        self._free: list[set[int]] = []
        first = 0
        for size in sizes:
            self._free.append(set(range(first, first + size)))
            first += size
        self._free_total = first

    # ------------------------------------------------------------------ queries

    @property
    def cluster_sizes(self) -> tuple[int, ...]:
        """Cores per cluster, in cluster order."""
        return self._sizes

    @property
    def total(self) -> int:
        """Number of cores on the device."""
        return len(self._cluster_of)

    def cluster_of(self, core: int) -> int:
        """The cluster that holds ``core``.

        Raises:
            RequestError: (field ``cores.ids``) if ``core`` is not a core id of the device.
        """
        self._check_id(core)
        return self._cluster_of[core]

    def free_count(self, cluster: int | None = None) -> int:
        """Free cores in ``cluster``, or on the whole device when ``cluster`` is None.

        Raises:
            RequestError: (field ``cores.cluster``) if ``cluster`` does not exist.
        """
        if cluster is None:
            return self._free_total
        self._check_cluster(cluster)
        return len(self._free[cluster])

    def is_free(self, core: int) -> bool:
        """True if ``core`` is free.

        Raises:
            RequestError: (field ``cores.ids``) if ``core`` is not a core id of the device.
        """
        self._check_id(core)
        return core in self._free[self._cluster_of[core]]

    def free_ids(self) -> list[int]:
        """All free core ids, sorted."""
        return sorted(core for free in self._free for core in free)

    # ---------------------------------------------------------------- mutations

    def allocate(
        self, count: int, *, same_cluster: bool = False, cluster: int | None = None
    ) -> list[int]:
        """Take ``count`` cores; return their ids, sorted.

        Policy (deterministic, so the C fast path can mirror it). Inside a cluster the lowest
        free ids are taken first.

        * ``cluster`` given: from that cluster only.
        * ``same_cluster=True``: **best-fit cluster** — the cluster with the fewest free cores
          that still has ``count``, the lowest index among equals. Best fit leaves the
          emptiest clusters whole for later large same-cluster requests.
        * otherwise **pack**: the same best-fit cluster if one cluster can hold the whole
          request; if none can, spill over the clusters in decreasing number of free cores
          (lowest index among equals), so the request touches as few clusters as possible.

        Raises:
            RequestError: (field ``cores``) if ``count`` is not an int >= 1, or exceeds what
                the device (or one cluster, when the request must stay in one) has at all;
                (field ``cores.cluster``) if ``cluster`` does not exist.
            InsufficientResources: ``("cores", count, available, "cores")`` when not enough
                cores are free now: ``available`` is the free count of ``cluster``, the most
                free cores in one cluster (``same_cluster``; the message names the
                same-cluster constraint), or the free total (pack).
        """
        self._check_allocate(count, same_cluster, cluster)
        if cluster is not None:
            if len(self._free[cluster]) < count:
                raise self._no_cores(count, same_cluster, cluster)
            return self._take_lowest(cluster, count)
        best = self._best_fit_cluster(count)
        if best is not None:
            return self._take_lowest(best, count)
        if same_cluster or self._free_total < count:
            raise self._no_cores(count, same_cluster, None)
        return self._spill(count)

    def _check_allocate(self, count: int, same_cluster: bool, cluster: int | None) -> None:
        """The state-independent checks of :meth:`allocate` (shared with the C fast path)."""
        if cluster is not None:
            self._check_cluster(cluster)
        if not _is_int(count) or count < 1:
            raise RequestError(
                "cores", f"count must be an int >= 1, got {count!r}", value=count, expected=">= 1"
            )
        if cluster is not None:
            self._check_count(count, self._sizes[cluster], f"cluster {cluster}")
        elif same_cluster:
            self._check_count(count, max(self._sizes), "the largest cluster")
        else:
            self._check_count(count, self.total, "the device")

    def _no_cores(
        self, count: int, same_cluster: bool, cluster: int | None
    ) -> InsufficientResources:
        """The error for a request the free cores cannot satisfy (from the public queries,
        so the C fast path raises exactly the same one)."""
        if cluster is not None:
            free = self.free_count(cluster)
            return _insufficient(
                count,
                free,
                f"cluster {cluster} has only {free} free cores",
                cluster=cluster,
                constraint="cluster",
            )
        free_total = self.free_count()
        if same_cluster:
            per_cluster = [self.free_count(c) for c in range(len(self._sizes))]
            most = max(per_cluster)
            return _insufficient(
                count,
                most,
                f"no single cluster has {count} free cores (same-cluster constraint); "
                f"the most free in one cluster is {most} (cluster {per_cluster.index(most)})",
                constraint="same_cluster",
                free_total=free_total,
            )
        return _insufficient(
            count,
            free_total,
            f"only {free_total} cores are free on the device",
            constraint="none",
            free_total=free_total,
        )

    def allocate_ids(self, ids: Iterable[int]) -> None:
        """Take exactly these cores (pinned cores, ledger recovery). All or nothing.

        Raises:
            RequestError: (field ``cores.ids``) for an id that is not a core of the device, or
                an id given twice.
            ResourceConflict: if any core is already held; ``details["cores"]`` lists them.
        """
        wanted = self._check_ids(ids)
        held = [core for core in wanted if core not in self._free[self._cluster_of[core]]]
        if held:
            raise _already_held(held)
        for core in wanted:
            self._free[self._cluster_of[core]].remove(core)
        self._free_total -= len(wanted)

    def release(self, ids: Iterable[int]) -> None:
        """Give these cores back. All or nothing.

        Raises:
            RequestError: (field ``cores.ids``) for an id that is not a core of the device, or
                an id given twice.
            ResourceConflict: if any core is already free (double free); ``details["cores"]``
                lists them.
        """
        given = self._check_ids(ids)
        free = [core for core in given if core in self._free[self._cluster_of[core]]]
        if free:
            raise _double_free(free)
        for core in given:
            self._free[self._cluster_of[core]].add(core)
        self._free_total += len(given)

    # ----------------------------------------------------------------- policies

    def _best_fit_cluster(self, count: int) -> int | None:
        """The cluster with the fewest free cores >= ``count`` (lowest index on ties)."""
        fits = [(len(free), c) for c, free in enumerate(self._free) if len(free) >= count]
        return min(fits)[1] if fits else None

    def _spill(self, count: int) -> list[int]:
        """Fill clusters in decreasing free count (lowest index on ties) until ``count``.

        The caller guarantees ``count <= free total``.
        """
        order = sorted(range(len(self._free)), key=lambda c: (-len(self._free[c]), c))
        taken: list[int] = []
        for cluster in order:
            part = min(len(self._free[cluster]), count - len(taken))
            taken.extend(self._take_lowest(cluster, part))
            if len(taken) == count:
                break
        return sorted(taken)

    def _take_lowest(self, cluster: int, count: int) -> list[int]:
        """Take the ``count`` lowest free ids of ``cluster`` (caller checked they exist)."""
        taken = sorted(self._free[cluster])[:count]
        self._free[cluster].difference_update(taken)
        self._free_total -= len(taken)
        return taken

    # --------------------------------------------------------------- validation

    def _check_count(self, count: int, limit: int, what: str) -> None:
        """Refuse a request that ``what`` could never satisfy, even with every core free."""
        if count > limit:
            raise RequestError(
                "cores",
                f"requested {count} cores, {what} has only {limit}",
                value=count,
                limit=limit,
                expected=f"<= {limit}",
            )

    def _check_cluster(self, cluster: object) -> None:
        if not _is_int(cluster) or not 0 <= cluster < len(self._sizes):
            raise RequestError(
                "cores.cluster",
                f"no cluster {cluster!r}; the device has clusters 0..{len(self._sizes) - 1}",
                value=cluster,
                expected=f"0..{len(self._sizes) - 1}",
            )

    def _check_id(self, core: object) -> None:
        if not _is_int(core) or not 0 <= core < self.total:
            raise RequestError(
                "cores.ids",
                f"unknown core id {core!r}; the device has cores 0..{self.total - 1}",
                value=core,
                expected=f"0..{self.total - 1}",
            )

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """Validate an id list: known ids, none twice. Returns it sorted."""
        given = list(ids)
        for core in given:
            self._check_id(core)
        if len(set(given)) != len(given):
            twice = sorted(core for core, n in Counter(given).items() if n > 1)
            raise RequestError(
                "cores.ids",
                f"core{'s' if len(twice) > 1 else ''} {_id_list(twice)} given more than once",
                value=twice,
                expected="distinct ids",
            )
        return sorted(given)


def _already_held(held: list[int]) -> ResourceConflict:
    return ResourceConflict(
        f"cores: core{'s' if len(held) > 1 else ''} {_id_list(held)} already held",
        field="cores.ids",
        cores=held,
        expected="free cores",
    )


def _double_free(free: list[int]) -> ResourceConflict:
    return ResourceConflict(
        f"cores: double free: core{'s' if len(free) > 1 else ''} {_id_list(free)} not held",
        field="cores.ids",
        cores=free,
        expected="held cores",
    )


def _id_list(ids: Iterable[int]) -> str:
    return ", ".join(str(core) for core in ids)
