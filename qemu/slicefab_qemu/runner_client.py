"""The host end of the guest runner (:mod:`slicefab_qemu.guest.runner`): JSON lines over the
Unix socket QEMU connects to the runner's virtio-serial port."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from pathlib import Path
from typing import Any

from slicefab_qemu.errors import VmError


class GuestCallError(VmError):
    """The guest runner answered with an error: ``type`` (the guest exception's class,
    e.g. ``PermissionDenied``), ``guest_code`` and the message."""


    def __init__(self, op: str, error: dict[str, Any]) -> None:
        self.type = str(error.get("type", "?"))
        self.guest_code = str(error.get("code", "?"))
        super().__init__(
            f"guest {op}: {self.type}: {error.get('message', '')}",
            type=self.type,
            guest_code=self.guest_code,
        )


class GuestRunner:
    """Requests to the runner in one guest; one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)

    def connect(self, timeout: float = 10.0) -> None:
        """Raises VmError if the socket cannot be connected within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self._sock = s
                return
            except OSError as e:
                s.close()
                if time.monotonic() > deadline:
                    raise VmError(f"cannot connect to the guest runner at {self.path}: {e}") from e
                time.sleep(0.05)

    def request(self, op: str, *, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its answer (its fields other than id/ok).

        Raises GuestCallError if the runner answered with an error, VmError on a time-out
        or a closed connection. The runner may still be starting (importing hostlib takes
        seconds under TCG): the request waits in the port until it reads it."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        rid = next(self._ids)
        self._sock.sendall(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                answer = json.loads(line)
                if answer.get("id") != rid:
                    continue  # the answer to a request that timed out earlier
                if not answer.get("ok"):
                    raise GuestCallError(op, answer.get("error", {}))
                answer.pop("id")
                answer.pop("ok")
                return dict(answer)
            left = deadline - time.monotonic()
            if left <= 0:
                raise VmError(f"guest {op}: no answer within {timeout:g} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise VmError(f"guest {op}: the runner's socket {self.path} closed")
            self._buf += chunk

    def call(
        self, method: str, *args: Any, expect: list[dict[str, Any]] | None = None,
        timeout: float = 60.0, **kwargs: Any,
    ) -> dict[str, Any]:
        """A :class:`hostlib.Device` method in the guest: ``{"result", "call_s"}`` and,
        with ``expect``, ``visible_s``. Raises as :meth:`request`."""
        fields: dict[str, Any] = {"method": method, "args": list(args), "kwargs": kwargs}
        if expect:
            fields["expect"] = expect
            fields["expect_timeout"] = timeout
        return self.request("call", timeout=timeout + 30, **fields)

    def wait(self, expect: list[dict[str, Any]], *, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the guest shows every ``expect`` condition (no call):
        ``{"visible_s"}``. Raises GuestCallError(TimeoutError) naming what it shows."""
        return self.request("wait", timeout=timeout + 30, expect=expect, expect_timeout=timeout)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
