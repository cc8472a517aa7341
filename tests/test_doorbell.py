"""The C doorbell wait (``sf_doorbell_wait``, cffi_ext/src/doorbell.c) that the firmware's
mailbox poller spins in without the GIL (firmware/mailboxes.py)."""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from firmware import fastpath

if not fastpath.enabled():  # pragma: no cover - SLICEFAB_FASTPATH=0 runs
    pytest.skip("the C fast path is not selected", allow_module_level=True)

ext = fastpath.extension()
ffi, lib = ext.ffi, ext.lib


class Words:
    """``n`` u64 doorbells in one anonymous mapping, as the C wait sees them."""

    def __init__(self, n: int) -> None:
        self.mm = mmap.mmap(-1, 4096)
        self.q = memoryview(self.mm).cast("Q")
        self.view = ffi.from_buffer(self.mm)
        self.words = ffi.new("uint64_t *[]", n)
        self.expected = ffi.new("uint64_t[]", n)
        self.n = n
        for i in range(n):
            self.words[i] = ffi.cast("uint64_t *", self.view) + 8 * i  # a cache line apart

    def wait(self, spin_s: float) -> int:
        return int(lib.sf_doorbell_wait(self.words, self.expected, self.n, int(spin_s * 1e9)))

    def close(self) -> None:
        ffi.release(self.view)
        self.q.release()
        self.mm.close()


@pytest.fixture
def words() -> Iterator[Words]:
    w = Words(4)
    try:
        yield w
    finally:
        w.close()


def test_an_unchanged_set_times_out_after_the_spin(words: Words) -> None:
    start = time.perf_counter()
    assert words.wait(0.002) == -1
    assert time.perf_counter() - start >= 0.002


def test_the_first_changed_word_is_reported(words: Words) -> None:
    words.q[8 * 2] = 6
    assert words.wait(1.0) == 2
    words.expected[2] = 6  # the poller took request 6: quiet again
    assert words.wait(0) == -1
    words.q[8 * 3] = 1  # odd, a write in progress, is a change too
    words.q[8 * 1] = 2
    assert words.wait(0) == 1


def test_a_null_word_is_skipped(words: Words) -> None:
    words.q[0] = 2
    words.words[0] = ffi.NULL
    assert words.wait(0) == -1


def test_no_spin_still_scans_once(words: Words) -> None:
    words.q[8] = 4
    assert words.wait(0) == 1


def test_a_store_from_another_thread_ends_the_wait_and_the_gil_is_free_meanwhile(
    words: Words,
) -> None:
    ticks = 0
    done = threading.Event()

    def other() -> None:  # a Python thread that needs the GIL to make any progress
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            if ticks == 20_000:
                words.q[8 * 3] = 8

    t = threading.Thread(target=other)
    t.start()
    try:
        # one wait of up to 10 s: it can only end early if the other thread ran, which it
        # can only do if the wait released the GIL
        assert words.wait(10.0) == 3
    finally:
        done.set()
        t.join()
    assert ticks >= 20_000


def test_zero_words_is_a_plain_spin() -> None:
    empty: Any = ffi.new("uint64_t *[]", 1)
    assert lib.sf_doorbell_wait(empty, ffi.new("uint64_t[]", 1), 0, 1000) == -1
