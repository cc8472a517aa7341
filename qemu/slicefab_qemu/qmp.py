"""Blocking access to QEMU's monitor (QMP) and guest agent (QGA) over ``qemu.qmp``.

``qemu.qmp`` is asyncio-only; the firmware calls the QMP backend from its request
threads and the launcher from plain code. :class:`QmpChannel` therefore owns one event
loop in a daemon thread and runs each call there (``run_coroutine_threadsafe``), with a
time-out on every call. The QEMU guest agent speaks the same JSON protocol without the
greeting and capability negotiation, so the same class serves both (``agent=True``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from slicefab_qemu.errors import QmpFailure, VmError

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0


class QmpChannel:
    """One connection to a QMP (or, with ``agent=True``, a guest agent) Unix socket."""

    def __init__(self, path: Path | str, *, agent: bool = False, name: str = "slicefab") -> None:
        self.path = str(path)
        self.agent = agent
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client = QMPClient(name)
        if agent:  # QGA: no greeting, no qmp_capabilities
            self._client.await_greeting = False
            self._client.negotiate = False
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        """Run ``coro`` on the loop thread. Raises VmError on a time-out or a closed
        channel (qemu.qmp's own errors pass through)."""
        if self._closed:
            coro.close()
            raise VmError(f"{what}: the channel to {self.path} is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise VmError(f"{what}: no answer from {self.path} within {timeout:g} s") from None

    def connect(self, timeout: float = 10.0) -> None:
        """Connect (retrying while the socket does not exist or refuses, until ``timeout``).

        Raises VmError if no connection could be made in time."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                self._run(self._client.connect(self.path), max(0.1, deadline - time.monotonic()),
                          "connect")
                return
            except (QMPError, OSError, VmError) as e:
                last = e
                time.sleep(0.05)
        raise VmError(f"cannot connect to {self.path} within {timeout:g} s: {last}")

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run one command and return its ``return`` value.

        Raises QmpFailure when QEMU answers with an error (its class and description are
        kept), VmError on a time-out or a lost connection."""
        return self._command(
            command,
            self._client.execute(command, dict(arguments) if arguments else None),
            timeout,
            command,
        )

    def _command(
        self, command: str, coro: Coroutine[Any, Any, T], timeout: float, what: str
    ) -> T:
        """:meth:`_run` for a QMP command: QEMU's error answer becomes QmpFailure, any
        other qemu.qmp error VmError."""
        try:
            return self._run(coro, timeout, what)
        except ExecuteError as e:
            raise QmpFailure(command, e.error_class, e.error.error.desc) from None
        except QMPError as e:
            raise VmError(f"{command}: {self.path}: {e}") from e

    def submit(
        self, command: str, arguments: Mapping[str, Any] | None = None
    ) -> Future[Any]:
        """Send ``command`` without waiting: its future completes with the ``return``
        value, or with qemu.qmp's error. For waits that must watch something else."""
        if self._closed:
            raise VmError(f"{command}: the channel to {self.path} is closed")
        return asyncio.run_coroutine_threadsafe(
            self._client.execute(command, dict(arguments) if arguments else None), self._loop
        )

    def execute_and_wait(
        self, command: str, arguments: Mapping[str, Any], event: str, match: Mapping[str, Any],
        *, timeout: float = DEFAULT_TIMEOUT,
    ) -> Mapping[str, Any]:
        """Run ``command``, then wait for an ``event`` whose data contains ``match`` (the
        listener is registered before the command is sent, so the event cannot be missed).
        Returns the event's data.

        Raises QmpFailure/VmError as :meth:`execute`, VmError if the event does not come
        within ``timeout`` seconds of the command."""

        async def go() -> Mapping[str, Any]:
            listener = EventListener(names=(event,))
            with self._client.listen(listener):
                await self._client.execute(command, dict(arguments))
                while True:
                    ev = await listener.get()
                    data = ev.get("data")
                    if isinstance(data, dict) and all(
                        data.get(k) == v for k, v in match.items()
                    ):
                        return dict(data)

        return self._command(command, go(), timeout, f"{command} (waiting for {event})")

    def close(self) -> None:
        """Disconnect and stop the loop thread. Idempotent; never raises."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5.0, "disconnect")
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> QmpChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Completed:
    """A guest command's outcome (QGA ``guest-exec-status``)."""

    exitcode: int
    stdout: str
    stderr: str


class GuestAgent:
    """The QEMU guest agent (``qemu-ga``, Debian ``qemu-guest-agent``) in a running guest:
    run programs, read files. Started by the guest's init (guest/init.sh)."""

    def __init__(self, path: Path | str) -> None:
        self.channel = QmpChannel(path, agent=True, name="qga")

    def connect(self, timeout: float) -> None:
        self.channel.connect(timeout)

    def spawn(self, argv: Sequence[str], *, capture: bool = True) -> int:
        """Start ``argv`` in the guest without waiting; returns its guest pid."""
        r = self.channel.execute(
            "guest-exec",
            {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture},
        )
        return int(r["pid"])

    def status(self, pid: int) -> Completed | None:
        """The outcome of a spawned program, or None while it runs."""
        st = self.channel.execute("guest-exec-status", {"pid": pid})
        if not st["exited"]:
            return None
        return Completed(
            int(st.get("exitcode", -1 if "signal" in st else 0)),
            base64.b64decode(st.get("out-data", "")).decode(errors="replace"),
            base64.b64decode(st.get("err-data", "")).decode(errors="replace"),
        )

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> Completed:
        """Run ``argv`` in the guest and wait for it.

        Raises VmError if it does not finish within ``timeout`` or, with ``check``, exits
        non-zero (the message carries its stderr)."""
        pid = self.spawn(argv)
        deadline = time.monotonic() + timeout
        pause = 0.01
        while (done := self.status(pid)) is None:
            if time.monotonic() > deadline:
                raise VmError(f"guest command {list(argv)} still running after {timeout:g} s")
            time.sleep(pause)
            pause = min(0.1, pause * 2)
        if check and done.exitcode != 0:
            raise VmError(
                f"guest command {list(argv)} exited {done.exitcode}: {done.stderr.strip()}"
            )
        return done

    def sh(self, script: str, *, timeout: float = 60.0) -> str:
        """``/bin/sh -c script`` in the guest; its stdout. Raises as :meth:`run`."""
        return self.run(["/bin/sh", "-c", script], timeout=timeout).stdout

    def close(self) -> None:
        self.channel.close()
