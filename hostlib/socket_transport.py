"""The Unix socket transport: the admin / CLI channel to the firmware.

Wire format: each frame is a u32 little-endian length followed by that many bytes, in
both directions, one response per request, in order. The length is checked against the
receiver's ``max_frame`` before any byte of the body is read, so a peer cannot make the
other side buffer more than ``max_frame``.

The server (:class:`SocketServer`) runs one thread per connection; each connection is a
:class:`SocketEndpoint` (a :class:`~hostlib.transport.ServerEndpoint`) that knows its
peer's credentials from ``SO_PEERCRED`` (:class:`PeerCred`), so the firmware can decide the
caller's role from its uid. The socket file is created with mode 0600.

A client (:class:`SocketClient`) that times out in the middle of a round trip drops its
connection rather than read a late response as the answer to its next request; the next
request connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hostlib.transport import (
    FrameTooLarge,
    Handler,
    PeerClosed,
    TransportError,
    TransportTimeout,
    deadline_after,
)

DEFAULT_MAX_FRAME = 1024 * 1024
FRAME_HEADER = struct.Struct("<I")
_PEERCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerCred:
    """The credentials of the process at the other end (``SO_PEERCRED``, as of connect)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCred:
        """Raises OSError if the socket is not a connected Unix socket."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(raw)
        return cls(pid, uid, gid)


def _too_large(what: str, n: int, limit: int) -> FrameTooLarge:
    return FrameTooLarge(
        f"{what} of {n} bytes exceeds the frame limit of {limit}", length=n, capacity=limit
    )


def _recv_exact(sock: socket.socket, n: int, deadline: float, *, started: bool) -> bytes:
    """Read exactly ``n`` bytes by ``deadline``.

    Raises PeerClosed on end of stream, TransportTimeout at the deadline (``started``
    says whether part of a frame was already read: only the message differs)."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TransportTimeout(
                "timed out in the middle of a frame" if started or buf else "no frame arrived"
            )
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            continue
        except OSError as e:
            raise PeerClosed(f"connection failed: {e}") from e
        if not chunk:
            raise PeerClosed("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def _send_frame(sock: socket.socket, frame: bytes, deadline: float) -> None:
    """Raises TransportTimeout, PeerClosed."""
    left = deadline - time.perf_counter()
    if left <= 0:
        raise TransportTimeout("no time left to send the frame")
    sock.settimeout(left)
    try:
        sock.sendall(FRAME_HEADER.pack(len(frame)) + frame)
    except TimeoutError:
        raise TransportTimeout("timed out sending a frame") from None
    except OSError as e:
        raise PeerClosed(f"connection failed: {e}") from e


class SocketEndpoint:
    """The firmware side of one accepted connection (a ServerEndpoint)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        frame_timeout: float = 5.0,
    ) -> None:
        """``frame_timeout`` bounds how long the rest of a frame may take once its first
        byte has arrived. Raises OSError if ``sock`` has no peer credentials."""
        self._sock = sock
        self.peer = PeerCred.of(sock)
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self._closed = False

    def serve_once(self, handler: Handler, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the start of a request, answer it; False if none
        started in time.

        Raises PeerClosed when the peer hung up or the endpoint was closed;
        FrameTooLarge if the request's length prefix (checked before its body is read)
        or the handler's response exceeds ``max_frame``, TransportTimeout if a started
        frame did not complete within ``frame_timeout``: in those three cases the
        connection is closed, since the stream can no longer be trusted to be in step.
        Re-raises what ``handler`` raised, after closing the connection (the peer sees
        PeerClosed)."""
        if self._closed:
            raise PeerClosed("endpoint closed")
        try:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        except (OSError, ValueError) as e:
            raise PeerClosed(f"connection failed: {e}") from e
        if not ready:
            return False
        try:
            deadline = deadline_after(self.frame_timeout)
            (n,) = FRAME_HEADER.unpack(_recv_exact(self._sock, 4, deadline, started=True))
            if n > self.max_frame:
                raise _too_large("request", n, self.max_frame)
            frame = _recv_exact(self._sock, n, deadline, started=True)
            response = handler(frame)
            if len(response) > self.max_frame:
                raise _too_large("response", len(response), self.max_frame)
            _send_frame(self._sock, response, deadline_after(self.frame_timeout))
        except BaseException:
            self.close()
            raise
        return True

    def interrupt(self) -> None:
        """Shut the connection down without closing it: a thread waiting in
        :meth:`serve_once` wakes up and gets PeerClosed. Safe from any thread."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


SocketHandler = Callable[[bytes, PeerCred], bytes]
"""A socket server's handler: the request frame and who sent it -> the response frame."""


class SocketServer:
    """A thread-per-connection server on a Unix socket, mode 0600.

    ``handler(frame, peer)`` runs in the connection's thread; several connections run
    their handlers concurrently, so it must be thread-safe. An error on one connection
    (a frame too large, a stalled frame, the handler raising) closes that connection only
    and is reported to ``on_error`` (default: logged)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: SocketHandler,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        frame_timeout: float = 5.0,
        backlog: int = 64,
        on_error: Callable[[PeerCred, BaseException], None] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self.backlog = backlog
        self.on_error = on_error
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[SocketEndpoint, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind (mode 0600 from the start: the socket's mode is set before bind) and
        start accepting.

        Raises TransportError if a live server already listens at the path, or the path
        is something other than a stale socket; OSError on other bind failures."""
        if self._listener is not None:
            raise TransportError("server already started")
        self._remove_stale()
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode (minus umask), so
            # there is no window in which another user could connect.
            os.fchmod(lst.fileno(), 0o600)
            lst.bind(self.path)
            os.chmod(self.path, 0o600)
            lst.listen(self.backlog)
        except BaseException:
            lst.close()
            raise
        self._listener = lst
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"sock-accept {self.path}", daemon=True
        )
        self._accept_thread.start()

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise TransportError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # nobody listens: a leftover of a server that died
            return
        finally:
            probe.close()
        raise TransportError(f"a server is already listening on {self.path}")

    def _accept_loop(self) -> None:
        lst = self._listener
        assert lst is not None
        while not self._stopping.is_set():
            try:
                conn, _ = lst.accept()
            except OSError as e:
                if self._stopping.is_set() or e.errno in (errno.EINVAL, errno.EBADF):
                    return
                log.warning("accept on %s failed: %s", self.path, e)
                time.sleep(0.01)
                continue
            try:
                ep = SocketEndpoint(
                    conn, max_frame=self.max_frame, frame_timeout=self.frame_timeout
                )
            except OSError:
                conn.close()
                continue
            t = threading.Thread(
                target=self._serve_connection,
                args=(ep,),
                name=f"sock-conn pid={ep.peer.pid}",
                daemon=True,
            )
            with self._lock:
                if self._stopping.is_set():
                    ep.close()
                    return
                self._conns[ep] = t
            t.start()

    def _serve_connection(self, ep: SocketEndpoint) -> None:
        def handle(frame: bytes) -> bytes:
            return self.handler(frame, ep.peer)

        try:
            while not self._stopping.is_set():
                ep.serve_once(handle, 0.5)
        except PeerClosed:
            pass
        except Exception as e:
            if not self._stopping.is_set():
                self._report(ep.peer, e)
        finally:
            ep.close()
            with self._lock:
                self._conns.pop(ep, None)

    def _report(self, peer: PeerCred, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(peer, exc)
        else:
            log.warning("connection from pid %d uid %d closed: %r", peer.pid, peer.uid, exc)

    @property
    def connections(self) -> int:
        """How many connections are being served."""
        with self._lock:
            return len(self._conns)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, wait for their threads (a handler that
        is running finishes first, up to ``timeout``) and remove the socket file.
        Idempotent."""
        self._stopping.set()
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            lst.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        with self._lock:
            conns = list(self._conns.items())
        for ep, _ in conns:
            ep.interrupt()
        for _, t in conns:
            t.join(timeout)

    def __enter__(self) -> SocketServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SocketClient:
    """The tool side of the admin socket (a ClientTransport and AsyncClientTransport).

    The blocking and the asyncio paths use separate connections: the socket for
    :meth:`request` is opened by the constructor, the stream for :meth:`arequest` on first
    use in each event loop. Both reconnect after a failure or a timeout."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        connect_timeout: float = 5.0,
    ) -> None:
        """Connect to the server.

        Raises PeerClosed if nothing listens at ``path``, TransportTimeout if the
        connection is not accepted within ``connect_timeout``, TransportError on other
        failures (e.g. permission denied)."""
        self.path = os.fspath(path)
        self.max_frame = max_frame
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._alock: asyncio.Lock | None = None
        self._astream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._sock = self._connect(deadline_after(connect_timeout))

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(1e-3, min(self.connect_timeout, deadline - time.perf_counter())))
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise PeerClosed(f"no server listening on {self.path}") from e
        except TimeoutError:
            sock.close()
            raise TransportTimeout(f"connecting to {self.path} timed out") from None
        except OSError as e:
            sock.close()
            raise TransportError(f"cannot connect to {self.path}: {e}") from e
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _check_size(self, frame: bytes) -> None:
        if len(frame) > self.max_frame:
            raise _too_large("request", len(frame), self.max_frame)

    def request(self, frame: bytes, timeout: float) -> bytes:
        """Send ``frame``, wait up to ``timeout`` s for the response.

        Raises FrameTooLarge (before sending) if ``frame`` exceeds ``max_frame``, or if the
        response's length prefix does (checked before its body is read); TransportTimeout;
        PeerClosed if the server closed the connection (the next request reconnects) or
        this client was closed; TransportError if it cannot connect."""
        self._check_size(frame)
        deadline = deadline_after(timeout)
        if not self._lock.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            raise TransportTimeout("another caller still holds this connection")
        try:
            if self._closed:
                raise PeerClosed("client closed")
            if self._sock is None:
                self._sock = self._connect(deadline)
            sock = self._sock
            try:
                _send_frame(sock, frame, deadline)
                (n,) = FRAME_HEADER.unpack(_recv_exact(sock, 4, deadline, started=False))
                if n > self.max_frame:
                    raise _too_large("response", n, self.max_frame)
                return _recv_exact(sock, n, deadline, started=True)
            except BaseException:
                self._drop()  # out of step with the server: never reuse this stream
                raise
        finally:
            self._lock.release()

    async def _astream_for_loop(
        self, deadline: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._astream is None:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                    self._astream = await asyncio.open_unix_connection(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise PeerClosed(f"no server listening on {self.path}") from e
            except TimeoutError:
                raise TransportTimeout(f"connecting to {self.path} timed out") from None
            except OSError as e:
                raise TransportError(f"cannot connect to {self.path}: {e}") from e
        return self._astream

    def _adrop(self) -> None:
        stream, self._astream = self._astream, None
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                stream[1].close()

    async def arequest(self, frame: bytes, timeout: float) -> bytes:
        """As :meth:`request`, over an asyncio stream. Raises the same errors."""
        self._check_size(frame)
        deadline = deadline_after(timeout)
        loop = asyncio.get_running_loop()
        if self._aloop is not loop:  # streams and locks belong to one loop
            self._adrop()
            self._aloop, self._alock = loop, asyncio.Lock()
        assert self._alock is not None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                await self._alock.acquire()
        except TimeoutError:
            raise TransportTimeout("another task still holds this connection") from None
        try:
            if self._closed:
                raise PeerClosed("client closed")
            reader, writer = await self._astream_for_loop(deadline)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                    writer.write(FRAME_HEADER.pack(len(frame)) + frame)
                    await writer.drain()
                    (n,) = FRAME_HEADER.unpack(await reader.readexactly(4))
                    if n > self.max_frame:
                        raise _too_large("response", n, self.max_frame)
                    return await reader.readexactly(n)
            except TimeoutError:
                self._adrop()
                raise TransportTimeout(f"no response within {timeout} s") from None
            except asyncio.IncompleteReadError as e:
                self._adrop()
                raise PeerClosed("the peer closed the connection") from e
            except (ConnectionError, OSError) as e:
                self._adrop()
                raise PeerClosed(f"connection failed: {e}") from e
            except BaseException:
                self._adrop()
                raise
        finally:
            self._alock.release()

    def close(self) -> None:
        """Close both connections. Idempotent. A request waiting in another thread fails
        at once with PeerClosed (its connection is shut down under it)."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._drop()
        self._adrop()

    def __enter__(self) -> SocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
