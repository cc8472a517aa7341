"""A behavioural model of a slice's memory on a device, and the pre-copy loop that moves it.

The crossbar model carries no memory *content*; live migration (docs/pool.md, "Live
migration") needs some, so that a test can tell a lost or duplicated write from a good
move. This model is page-granular:

* :class:`PageStore` — one part's memory on one device: per page the last value written
  and a write **version** (how many writes the page has taken), plus a **dirty bitmap**
  that writes set while tracking is on. Turning tracking on and taking the dirty pages
  (:meth:`PageStore.take_dirty`) are atomic with respect to writes, so a page written
  after it was taken is dirty again.
* :class:`MemoryMap` — the VM's access path to the part: it routes each read and write to
  the store that currently backs the part. :meth:`MemoryMap.pause` closes a gate: a
  request that arrives while it is closed **waits** (it never fails) until
  :meth:`MemoryMap.resume`; the time it waited is the VM's stall.
* :class:`CopyLink` — the device-to-device copy path, with a bandwidth (bytes/s), so that a
  pre-copy round takes time during which the VM keeps dirtying pages.
* :func:`live_copy` — copy-then-switch: round 0 copies every page with tracking on, then
  each round re-copies the pages dirtied during the previous one, until few are left
  (``remainder_pages``), the dirty set stops shrinking, or ``max_rounds`` is reached; then
  the switch: pause, copy the last dirty pages, ``commit()`` (the caller's fabric and etcd
  switch), re-route, resume. :func:`stop_and_copy` is the baseline: pause, copy everything,
  commit, re-route, resume.

If the copy or ``commit()`` raises, the map still routes to the source, writes resume
there, and the error is re-raised: the part stays where it was.

No etcd and no device here: firmware/pool/migrate.py drives this from the pool protocol.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from firmware.errors import RequestError, SlicefabError
from firmware.units import MiB, format_size

#: the model's page: the device's allocation granule (docs/pool.md, "Live migration")
DEFAULT_PAGE_SIZE = 2 * MiB
#: a copy round stops early when at most this fraction of the pages is dirty ...
REMAINDER_FRACTION = 0.01
#: ... or this many pages, whichever is larger
MIN_REMAINDER_PAGES = 8
MAX_ROUNDS = 8
#: pages copied under one hold of the source's lock (bounds how long a write can wait on it)
COPY_BATCH = 64


class CopyFailed(SlicefabError):
    """A page copy between two devices failed; the part stays on its source."""


class PageStore:
    """One part's memory on one device: ``pages`` pages of ``page_size`` bytes."""

    def __init__(self, pages: int, page_size: int = DEFAULT_PAGE_SIZE, *, name: str = "") -> None:
        if pages < 1:
            raise RequestError("pages", f"{pages} is not a page count", expected=">= 1")
        if page_size < 4096 or page_size & (page_size - 1):
            raise RequestError(
                "page_size", f"{page_size} is not a page size", expected="a power of 2 >= 4 KiB"
            )
        self.pages = pages
        self.page_size = page_size
        self.name = name
        self._values = array("q", bytes(8 * pages))
        self._versions = array("Q", bytes(8 * pages))
        self._dirty = bytearray(pages)
        self._dirty_list: list[int] = []
        self._tracking = False
        self._lock = threading.Lock()
        #: set when the part is freed: a copy from or to it fails (CopyFailed)
        self.released = False

    @classmethod
    def for_bytes(
        cls, size: int, page_size: int = DEFAULT_PAGE_SIZE, *, name: str = ""
    ) -> PageStore:
        if size < page_size or size % page_size:
            raise RequestError(
                "memory",
                f"{format_size(size)} is not a whole number of {format_size(page_size)} pages",
                limit=page_size,
            )
        return cls(size // page_size, page_size, name=name)

    @property
    def size(self) -> int:
        return self.pages * self.page_size

    def _check(self, page: int) -> None:
        if not 0 <= page < self.pages:
            raise RequestError("page", f"page {page} is outside the part", limit=self.pages - 1)

    def write(self, page: int, value: int) -> None:
        """A VM's write: the page takes ``value`` and one more version; dirty if tracked."""
        self._check(page)
        with self._lock:
            self._values[page] = value
            self._versions[page] += 1
            if self._tracking and not self._dirty[page]:
                self._dirty[page] = 1
                self._dirty_list.append(page)

    def read(self, page: int) -> tuple[int, int]:
        """(value, version) of ``page``."""
        self._check(page)
        with self._lock:
            return self._values[page], self._versions[page]

    def start_tracking(self) -> None:
        """Dirty tracking on, with an empty bitmap."""
        with self._lock:
            self._tracking = True
            self._dirty = bytearray(self.pages)
            self._dirty_list = []

    def stop_tracking(self) -> None:
        with self._lock:
            self._tracking = False
            self._dirty = bytearray(self.pages)
            self._dirty_list = []

    def take_dirty(self) -> list[int]:
        """The pages written since tracking started or since the last call, in the order
        first written; clears the bitmap (atomically with respect to writes)."""
        with self._lock:
            pages, self._dirty_list = self._dirty_list, []
            self._dirty = bytearray(self.pages)
            return pages

    def dirty_count(self) -> int:
        with self._lock:
            return len(self._dirty_list)

    def snapshot(self, pages: Sequence[int]) -> tuple[list[int], list[int]]:
        """Values and versions of ``pages``, read together under the lock."""
        with self._lock:
            return [self._values[p] for p in pages], [self._versions[p] for p in pages]

    def load(self, pages: Sequence[int], values: Sequence[int], versions: Sequence[int]) -> None:
        """Install copied pages (the destination side of a copy; not a VM write)."""
        with self._lock:
            for p, v, n in zip(pages, values, versions, strict=True):
                self._values[p] = v
                self._versions[p] = n

    def contents(self) -> tuple[list[int], list[int]]:
        """Every page's value and version (tests, checks)."""
        with self._lock:
            return self._values.tolist(), self._versions.tolist()


class MemoryMap:
    """The VM's access path to one part's memory: it routes to the store that backs the
    part now, and holds requests (they wait, they do not fail) while the gate is closed."""

    def __init__(self, store: PageStore, device: str = "") -> None:
        self.store = store
        self.device = device
        self._cond = threading.Condition()
        self._paused = False
        #: requests that had to wait at the closed gate, and the longest wait (s)
        self.waited = 0
        self.longest_wait_s = 0.0

    def _enter(self) -> PageStore:
        """Wait while paused (the caller holds the condition); returns the store."""
        if self._paused:
            t0 = time.perf_counter()
            while self._paused:
                self._cond.wait()
            self.waited += 1
            self.longest_wait_s = max(self.longest_wait_s, time.perf_counter() - t0)
        return self.store

    def write(self, page: int, value: int) -> None:
        with self._cond:
            self._enter().write(page, value)

    def read(self, page: int) -> tuple[int, int]:
        with self._cond:
            return self._enter().read(page)

    def pause(self) -> None:
        """Close the gate. When this returns no request is in flight (each runs under the
        condition) and every new one waits."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def reroute(self, store: PageStore, device: str) -> None:
        """Back the part by ``store`` on ``device`` from now on (gate closed by the caller)."""
        with self._cond:
            self.store = store
            self.device = device


class CopyLink:
    """The copy path between two devices: ``bandwidth`` bytes/s (0: unlimited). Copies in
    batches of :data:`COPY_BATCH` pages and sleeps to keep to the bandwidth."""

    def __init__(self, bandwidth: float = 0.0) -> None:
        if bandwidth < 0:
            raise RequestError("bandwidth", f"{bandwidth} B/s is negative", expected=">= 0")
        self.bandwidth = bandwidth

    def copy(self, src: PageStore, dst: PageStore, pages: Sequence[int]) -> int:
        """Copy ``pages`` from ``src`` to ``dst``; returns how many. Raises CopyFailed."""
        if src.pages != dst.pages or src.page_size != dst.page_size:
            raise CopyFailed(
                f"source {src.name or 'part'} has {src.pages} pages of "
                f"{format_size(src.page_size)}, destination {dst.name or 'part'} has "
                f"{dst.pages} of {format_size(dst.page_size)}",
                field="pages",
                expected=src.pages,
            )
        t0 = time.perf_counter()
        done = 0
        for i in range(0, len(pages), COPY_BATCH):
            if src.released or dst.released:
                which = "source" if src.released else "destination"
                raise CopyFailed(f"the {which} part was freed during the copy", part=which)
            batch = pages[i : i + COPY_BATCH]
            values, versions = src.snapshot(batch)
            self.transfer(batch)
            dst.load(batch, values, versions)
            done += len(batch)
            if self.bandwidth:
                due = t0 + done * src.page_size / self.bandwidth
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        return done

    def transfer(self, pages: Sequence[int]) -> None:
        """One batch on the wire. The model's link cannot fail; a test's link can (a
        stand-in that raises CopyFailed here)."""


@dataclass
class CopyStats:
    """What a move cost: pages copied (all rounds) vs pages in the part, the rounds,
    the pages copied during the switch, and the times (s)."""

    pages: int
    page_size: int
    pages_copied: int = 0
    rounds: int = 0
    round_pages: list[int] = field(default_factory=list)
    switch_pages: int = 0
    switch_s: float = 0.0  # gate closed → gate open: the longest any VM request can wait
    total_s: float = 0.0
    converged: bool = True  # False when the dirty set stopped shrinking or rounds ran out

    @property
    def copy_overhead(self) -> float:
        """Pages copied / pages in the part (1.0: each page copied once)."""
        return self.pages_copied / self.pages

    def to_dict(self) -> dict[str, object]:
        return {
            "pages": self.pages,
            "page_size": self.page_size,
            "pages_copied": self.pages_copied,
            "copy_overhead": round(self.copy_overhead, 3),
            "rounds": self.rounds,
            "round_pages": self.round_pages,
            "switch_pages": self.switch_pages,
            "switch_ms": round(self.switch_s * 1000, 3),
            "total_ms": round(self.total_s * 1000, 3),
            "converged": self.converged,
        }


def _switch(
    vm: MemoryMap,
    src: PageStore,
    dst: PageStore,
    device: str,
    link: CopyLink,
    pages: Callable[[], Iterable[int]],
    commit: Callable[[], None],
    stats: CopyStats,
) -> None:
    """Pause, copy ``pages()``, commit, re-route to ``dst``, resume. On any error the map
    still routes to ``src`` and writes resume there."""
    vm.pause()
    t0 = time.perf_counter()
    try:
        last = list(pages())
        stats.switch_pages = link.copy(src, dst, last)
        stats.pages_copied += stats.switch_pages
        commit()
        vm.reroute(dst, device)
    finally:
        src.stop_tracking()
        stats.switch_s = time.perf_counter() - t0
        vm.resume()


def live_copy(
    vm: MemoryMap,
    dst: PageStore,
    device: str,
    commit: Callable[[], None],
    *,
    link: CopyLink | None = None,
    max_rounds: int = MAX_ROUNDS,
    remainder_pages: int | None = None,
) -> CopyStats:
    """Move the part behind ``vm`` to ``dst`` on ``device`` by pre-copy (module docstring).
    ``commit()`` runs with the gate closed, after the last copy and before the re-route:
    it is the fabric and pool switch. Raises CopyFailed or what ``commit`` raises (the
    part then stays on its source)."""
    link = link or CopyLink()
    src = vm.store
    if not 1 <= max_rounds <= 64:
        raise RequestError("max_rounds", f"{max_rounds} is out of range", limit="1..64")
    left = (
        remainder_pages
        if remainder_pages is not None
        else max(MIN_REMAINDER_PAGES, int(src.pages * REMAINDER_FRACTION))
    )
    stats = CopyStats(src.pages, src.page_size)
    t0 = time.perf_counter()
    src.start_tracking()
    try:
        todo: list[int] = list(range(src.pages))
        while True:
            stats.rounds += 1
            stats.round_pages.append(len(todo))
            stats.pages_copied += link.copy(src, dst, todo)
            dirty = src.dirty_count()
            if dirty <= left:
                break
            if stats.rounds >= max_rounds or dirty >= len(todo):
                stats.converged = False  # the VM dirties pages as fast as the link copies
                break
            todo = src.take_dirty()
    except BaseException:
        src.stop_tracking()
        raise
    _switch(vm, src, dst, device, link, src.take_dirty, commit, stats)
    stats.total_s = time.perf_counter() - t0
    return stats


def stop_and_copy(
    vm: MemoryMap,
    dst: PageStore,
    device: str,
    commit: Callable[[], None],
    *,
    link: CopyLink | None = None,
) -> CopyStats:
    """The baseline: pause the VM, copy every page, commit, re-route, resume."""
    link = link or CopyLink()
    src = vm.store
    stats = CopyStats(src.pages, src.page_size, rounds=0)
    t0 = time.perf_counter()
    _switch(vm, src, dst, device, link, lambda: range(src.pages), commit, stats)
    stats.total_s = time.perf_counter() - t0
    return stats


class MemoryDirectory:
    """Where the page stores of the devices of one process are, and the VMs' maps.

    A device (firmware.pool.member.PoolMember, given a directory) adds a zeroed store for
    each part it programs and marks it released when it frees the part; a VM opens a
    :class:`MemoryMap` on its part; the migrator finds both here. Devices in other
    processes have their own directories: content is modelled within one process
    (docs/pool.md, "Live migration")."""

    def __init__(self, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.page_size = page_size
        self._stores: dict[tuple[str, str], PageStore] = {}
        self._maps: dict[tuple[str, str], MemoryMap] = {}
        self._lock = threading.Lock()

    def add(self, device: str, cid: str, size: int) -> PageStore:
        store = PageStore.for_bytes(size, self.page_size, name=f"{device}:{cid}")
        with self._lock:
            self._stores[(device, cid)] = store
        return store

    def drop(self, device: str, cid: str) -> None:
        with self._lock:
            store = self._stores.pop((device, cid), None)
        if store is not None:
            store.released = True

    def store(self, device: str, cid: str) -> PageStore | None:
        with self._lock:
            return self._stores.get((device, cid))

    def open_map(self, cid: str, device: str) -> MemoryMap:
        """The VM's map of composition ``cid``'s memory part on ``device`` (one per part:
        the migrator re-routes it). Raises RequestError if the part has no memory there."""
        with self._lock:
            m = self._maps.get((cid, device))
            if m is not None:
                return m
            store = self._stores.get((device, cid))
            if store is None:
                raise RequestError(
                    "composition", f"{cid} has no memory part on {device}", device=device
                )
            m = self._maps[(cid, device)] = MemoryMap(store, device)
            return m

    def map_of(self, cid: str, device: str) -> MemoryMap | None:
        with self._lock:
            return self._maps.get((cid, device))

    def moved(self, cid: str, source: str, target: str) -> None:
        """The part of ``cid`` moved from ``source`` to ``target``: its map follows."""
        with self._lock:
            m = self._maps.pop((cid, source), None)
            if m is not None:
                self._maps[(cid, target)] = m


class SequenceWriter:
    """A VM writing its part's pages through its map (tests and ``bench adaptive``): the
    n-th write carries value n. ``hot_share`` of the writes go to the first
    ``hot_fraction`` of the pages (a working set), the rest anywhere, at ``rate`` writes/s.
    It records, per page, the last value and the number of writes, every failed request,
    and the longest time one write took (the stall it saw); :meth:`check` compares a
    store with that record: no lost and no duplicated write."""

    def __init__(
        self,
        vm: MemoryMap,
        *,
        rate: float = 5000.0,
        hot_fraction: float = 0.1,
        hot_share: float = 0.9,
        seed: int = 0,
    ) -> None:
        import random

        if rate <= 0:
            raise RequestError("rate", f"{rate} writes/s", expected="> 0")
        self.vm = vm
        self.rate = rate
        self.hot = max(1, int(vm.store.pages * hot_fraction))
        self.hot_share = hot_share
        self._rng = random.Random(seed)
        self.last: dict[int, int] = {}
        self.counts: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self.writes = 0
        self.longest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vm-writer", daemon=True)

    def _run(self) -> None:
        pages = self.vm.store.pages
        t0 = time.perf_counter()
        while not self._stop.is_set():
            r = self._rng
            page = r.randrange(self.hot) if r.random() < self.hot_share else r.randrange(pages)
            seq = self.writes + 1
            start = time.perf_counter()
            try:
                self.vm.write(page, seq)
            except BaseException as e:  # the VM must never see one: tests assert none
                self.errors.append(e)
                return
            took = time.perf_counter() - start
            self.longest_s = max(self.longest_s, took)
            self.writes = seq
            self.last[page] = seq
            self.counts[page] = self.counts.get(page, 0) + 1
            delay = t0 + seq / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)

    def start(self) -> SequenceWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def __enter__(self) -> SequenceWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check(self, store: PageStore) -> list[str]:
        """Where ``store`` differs from what was written (empty when every page holds its
        last written value and exactly as many writes as were made)."""
        values, versions = store.contents()
        bad = []
        for p in range(store.pages):
            want = (self.last.get(p, 0), self.counts.get(p, 0))
            if (values[p], versions[p]) != want:
                bad.append(
                    f"page {p}: holds value {values[p]} after {versions[p]} writes, "
                    f"expected {want[0]} after {want[1]}"
                )
        return bad
