"""The transport layer: one interface for carrying opaque request/response frames between
a VM process (or an admin tool) and the firmware, and the errors every transport raises.

A *frame* is ``bytes`` whose meaning belongs to ``abi`` (a CXL CCI message, CXL r3.1
fig. 7-19); transports never look inside it. Two transports implement the
interface: the shared-memory BAR mailbox (:mod:`hostlib.mailbox`, one per VM) and the Unix
socket (:mod:`hostlib.socket_transport`, the admin/CLI channel). The firmware imports this
module too: it is the wire layer both sides share, so it depends on the standard library
only.

Exception tree::

    TransportError              root: the frame did not make the round trip
     ├── TransportTimeout       no answer (or no request, on the server) before the deadline
     ├── MailboxLayoutError     a mailbox region with a bad signature, version, size or offsets
     ├── FrameTooLarge          a frame longer than the channel's capacity, refused before copying
     └── PeerClosed             the other end closed the channel (or was never there)

Waiting is done by polling with a :class:`PollPolicy`: spin briefly (a round trip on an idle
host takes a few µs), then sleep with exponential back-off so an idle channel costs little.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Handler = Callable[[bytes], bytes]
"""What a server runs on each request frame: returns the response frame."""


class TransportError(Exception):
    """Root of every error a transport raises on purpose."""


class TransportTimeout(TransportError):
    """The deadline passed before the response (client) or a request (server) arrived."""


class MailboxLayoutError(TransportError):
    """The mailbox region is not one this code can use: wrong signature, unsupported
    layout version, a size that does not match the file, or inconsistent offsets."""


class FrameTooLarge(TransportError):
    """A frame exceeds the channel's capacity. Raised before any byte of it is copied.

    ``length`` is the offending length (-1 when the peer refused a frame without saying
    how long it was), ``capacity`` the limit it broke."""

    def __init__(self, message: str, *, length: int, capacity: int) -> None:
        super().__init__(message)
        self.length = length
        self.capacity = capacity


class PeerClosed(TransportError):
    """The other end closed the channel, or this end was closed while waiting."""


@runtime_checkable
class ClientTransport(Protocol):
    """The VM / tool side of a channel: one outstanding request at a time."""

    def request(self, frame: bytes, timeout: float) -> bytes:
        """Send one request frame and wait up to ``timeout`` seconds for its response.

        Raises :class:`FrameTooLarge`, :class:`TransportTimeout`, :class:`PeerClosed` or
        another :class:`TransportError`."""
        ...

    def close(self) -> None:
        """Release the channel. Idempotent."""
        ...


@runtime_checkable
class AsyncClientTransport(Protocol):
    """The asyncio flavour of :class:`ClientTransport`; never blocks the event loop for
    longer than a short, bounded spin."""

    async def arequest(self, frame: bytes, timeout: float) -> bytes:
        """As :meth:`ClientTransport.request`, raising the same errors."""
        ...

    def close(self) -> None:
        """Release the channel. Idempotent."""
        ...


@runtime_checkable
class ServerEndpoint(Protocol):
    """The firmware side of one channel."""

    def serve_once(self, handler: Handler, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for one request, answer it with ``handler``'s
        response and return True; return False if no request arrived in time.

        Raises :class:`FrameTooLarge` (after answering the peer with an error) when the
        request or the handler's response exceeds the capacity, :class:`PeerClosed` when
        the channel is gone, and re-raises whatever ``handler`` raised (after telling the
        peer that the request failed, where the transport can)."""
        ...

    def close(self) -> None:
        """Release the channel. Idempotent."""
        ...


@dataclass(frozen=True)
class PollPolicy:
    """How a side waits for the other: busy-poll for ``spin`` seconds, then sleep, starting
    at ``min_sleep`` and doubling up to ``max_sleep``.

    The spin keeps a round trip in the µs range when the peer is quick; the cap on the
    sleep bounds both the latency after an idle period and the CPU an idle channel costs
    (about ``1 / max_sleep`` wake-ups a second).

    While spinning in a process that runs only one thread, a side calls
    ``os.sched_yield()`` at most every ``yield_interval`` seconds; with other threads in
    the process it yields on every poll. A yield is what lets a peer thread take the GIL:
    with the server in a thread of the client's process, a 20 µs interval made the round
    trip 403 µs instead of 16 µs, because the spinning thread takes the GIL back before
    the woken peer can run. Without peer threads, a yield on every poll is only a system
    call that makes the spinning side a heavier neighbour: the authenticated no-op
    against the daemon took 85–148 µs (three runs) with a yield per poll and 54–75 µs
    (five runs) with one every 20 µs (docs/benchmarks.md)."""

    spin: float = 200e-6
    min_sleep: float = 20e-6
    max_sleep: float = 1e-3
    yield_interval: float = 20e-6

    def __post_init__(self) -> None:
        if (
            self.spin < 0
            or self.min_sleep <= 0
            or self.max_sleep < self.min_sleep
            or self.yield_interval < 0
        ):
            raise ValueError(f"invalid poll policy {self}")


DEFAULT_POLL = PollPolicy()


class Backoff:
    """One wait: call :meth:`pause` (or ``await`` :meth:`apause`) between polls.

    During the spin phase a pause returns at once, and every ``yield_interval`` (every
    pause if the process runs other threads) it is an ``os.sched_yield()``: that gives
    the CPU to a runnable peer on the same core and, in a threaded process, drops the
    GIL so that a peer thread can run at all (a Python thread spinning without releasing
    the GIL would keep the other side waiting for the interpreter's 5 ms switch
    interval)."""

    __slots__ = ("_deadline", "_interval", "_next_sleep", "_next_yield", "_policy", "_spin_until")

    def __init__(self, policy: PollPolicy, deadline: float) -> None:
        now = time.perf_counter()
        self._policy = policy
        self._deadline = deadline
        self._spin_until = now + policy.spin
        self._next_sleep = policy.min_sleep
        # The first pause yields and decides the interval: counting threads costs half a
        # microsecond, which a round trip pays only while it waits, not before it posts.
        self._interval = -1.0
        self._next_yield = now

    def pause(self) -> bool:
        """Wait a little; False once the deadline has passed (nothing was waited)."""
        now = time.perf_counter()
        if now >= self._deadline:
            return False
        if now < self._spin_until:
            if now >= self._next_yield:
                if self._interval < 0:
                    # a peer thread needs the GIL back at every poll (see PollPolicy)
                    interval = self._policy.yield_interval
                    self._interval = interval if threading.active_count() == 1 else 0.0
                os.sched_yield()
                self._next_yield = now + self._interval
            return True
        time.sleep(min(self._next_sleep, self._deadline - now))
        self._next_sleep = min(self._next_sleep * 2, self._policy.max_sleep)
        return True

    async def apause(self) -> bool:
        """As :meth:`pause`, yielding to the event loop instead of blocking it: during the
        spin phase each pause is ``os.sched_yield()`` plus one trip round the loop
        (``asyncio.sleep(0)``), so other tasks, e.g. the clients of other mailboxes, keep
        running. After the spin, sleeps are at least 1 ms: asyncio's epoll timeout has
        millisecond resolution."""
        now = time.perf_counter()
        if now >= self._deadline:
            return False
        if now < self._spin_until:
            os.sched_yield()  # let a peer on this core run; the loop's poll does not
            await asyncio.sleep(0)
            return True
        await asyncio.sleep(min(self._next_sleep, self._deadline - now))
        self._next_sleep = min(self._next_sleep * 2, self._policy.max_sleep)
        return True


def deadline_after(timeout: float) -> float:
    """The ``time.perf_counter()`` value ``timeout`` seconds from now.

    Raises ValueError for a negative or NaN timeout."""
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0, got {timeout!r}")
    return time.perf_counter() + timeout
