"""The Unix socket transport: framing, limits, peer credentials, ordering, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostlib.socket_transport import (
    PeerCred,
    SocketClient,
    SocketEndpoint,
    SocketHandler,
    SocketServer,
)
from hostlib.transport import (
    AsyncClientTransport,
    ClientTransport,
    FrameTooLarge,
    PeerClosed,
    ServerEndpoint,
    TransportError,
    TransportTimeout,
)

MAX = 8192


def transform(frame: bytes, peer: PeerCred | None = None) -> bytes:
    """A response that differs from its request in content and size."""
    return hashlib.sha256(frame).digest() + frame[::-1][: MAX - 32]


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "admin.sock"


@contextlib.contextmanager
def serving(
    path: Path, handler: SocketHandler = transform, *, frame_timeout: float = 5.0
) -> Iterator[tuple[SocketServer, list[BaseException]]]:
    """A started SocketServer; yields it and the errors it reported."""
    errors: list[BaseException] = []
    server = SocketServer(
        path,
        handler,
        max_frame=MAX,
        frame_timeout=frame_timeout,
        on_error=lambda p, e: errors.append(e),
    )
    server.start()
    try:
        yield server, errors
    finally:
        server.stop()


def slow(seconds: float) -> SocketHandler:
    def handler(frame: bytes, peer: PeerCred) -> bytes:
        time.sleep(seconds)
        return frame

    return handler


def wait_until(cond: object, timeout: float = 5.0) -> bool:
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if callable(cond) and cond():
            return True
        time.sleep(0.005)
    return False


# --- round trips --------------------------------------------------------------------


def test_the_classes_implement_the_transport_protocols(sock_path: Path) -> None:
    with serving(sock_path), SocketClient(sock_path) as c:
        assert isinstance(c, ClientTransport)
        assert isinstance(c, AsyncClientTransport)
    a, b = socket.socketpair(socket.AF_UNIX)
    ep = SocketEndpoint(a)
    assert isinstance(ep, ServerEndpoint)
    ep.close()
    b.close()


def test_random_frames_round_trip_both_ways(sock_path: Path) -> None:
    with serving(sock_path) as (_, errors), SocketClient(sock_path, max_frame=MAX) as c:

        @settings(max_examples=150, deadline=None)
        @given(st.one_of(st.binary(max_size=64), st.binary(min_size=MAX - 64, max_size=MAX)))
        def check(frame: bytes) -> None:
            assert c.request(frame, 5) == transform(frame)

        check()
    assert errors == []


def test_the_wire_format_is_a_u32_le_length_then_the_frame(sock_path: Path) -> None:
    with serving(sock_path, lambda f, p: b"pong:" + f):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.sendall(b"\x04\x00\x00\x00ping")
        s.settimeout(5)
        got = b""
        while len(got) < 13:
            got += s.recv(64)
        assert got == b"\x09\x00\x00\x00pong:ping"
        s.close()


def test_the_handler_sees_the_peer_credentials(sock_path: Path) -> None:
    peers: list[PeerCred] = []

    def record(frame: bytes, peer: PeerCred) -> bytes:
        peers.append(peer)
        return b""

    with serving(sock_path, record), SocketClient(sock_path) as c:
        c.request(b"x", 5)
    assert peers == [PeerCred(os.getpid(), os.getuid(), os.getgid())]


def test_the_socket_is_private_from_birth_even_with_a_permissive_umask(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # without the chmod after bind, the mode set on the socket before bind must suffice:
    # there is no moment at which another user could connect
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    old = os.umask(0)
    try:
        with serving(sock_path):
            assert os.stat(sock_path).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert not sock_path.exists()  # stop() removes it


def test_connections_are_served_concurrently(sock_path: Path) -> None:
    barrier = threading.Barrier(3, timeout=5)

    def rendezvous(frame: bytes, peer: PeerCred) -> bytes:
        barrier.wait()  # only passes if three handlers run at the same time
        return frame

    results: list[bytes] = []

    def one(tag: bytes) -> None:
        with SocketClient(sock_path) as c:
            results.append(c.request(tag, 10))

    with serving(sock_path, rendezvous) as (_, errors):
        threads = [threading.Thread(target=one, args=(bytes([65 + i]),)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(results) == [b"A", b"B", b"C"]
    assert errors == []


def test_threads_sharing_one_client_get_their_own_responses(sock_path: Path) -> None:
    failures: list[str] = []
    with serving(sock_path), SocketClient(sock_path, max_frame=MAX) as c:

        def caller(tag: int) -> None:
            for i in range(50):
                f = f"{tag}:{i}".encode() * (1 + i % 5)
                if c.request(f, 10) != transform(f):
                    failures.append(f"{tag}:{i}")

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert failures == []


# --- limits -------------------------------------------------------------------------


def test_client_refuses_an_oversize_request_before_sending(sock_path: Path) -> None:
    calls: list[bytes] = []

    def h(frame: bytes, peer: PeerCred) -> bytes:
        calls.append(frame)
        return frame

    with serving(sock_path, h), SocketClient(sock_path, max_frame=MAX) as c:
        with pytest.raises(FrameTooLarge) as ei:
            c.request(b"x" * (MAX + 1), 5)
        assert (ei.value.length, ei.value.capacity) == (MAX + 1, MAX)
        assert c.request(b"still in step", 5) == b"still in step"
    assert calls == [b"still in step"]


def test_server_refuses_an_oversize_length_before_reading_the_body(sock_path: Path) -> None:
    calls: list[bytes] = []

    def h(frame: bytes, peer: PeerCred) -> bytes:
        calls.append(frame)
        return frame

    with serving(sock_path, h, frame_timeout=30.0) as (_, errors):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.sendall(struct.pack("<I", MAX + 1))  # a header, and no body will ever follow
        s.settimeout(5)
        t0 = time.perf_counter()
        assert s.recv(16) == b""  # hung up at once, not after waiting for the body
        assert time.perf_counter() - t0 < 2
        s.close()
        assert wait_until(lambda: len(errors) == 1)
    assert isinstance(errors[0], FrameTooLarge)
    assert calls == []


@contextlib.contextmanager
def fake_server(path: Path, reply: bytes) -> Iterator[None]:
    """A server that answers a request with raw ``reply`` bytes and keeps the line open
    (one connection at a time)."""
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(str(path))
    lst.listen()
    done = threading.Event()

    def run() -> None:
        lst.settimeout(0.05)
        conns = []
        while not done.is_set():
            try:
                conn, _ = lst.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                if conn.recv(1024):
                    conn.sendall(reply)
        for conn in conns:
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(10)
        lst.close()


def test_client_refuses_an_oversize_response_length_before_reading(sock_path: Path) -> None:
    with (
        fake_server(sock_path, struct.pack("<I", MAX + 1)),
        SocketClient(sock_path, max_frame=MAX) as c,
    ):
        t0 = time.perf_counter()
        with pytest.raises(FrameTooLarge):
            c.request(b"x", 5)  # a client that read on would wait 5 s for the body
        assert time.perf_counter() - t0 < 2


def test_an_oversize_response_closes_the_connection(sock_path: Path) -> None:
    with serving(sock_path, lambda f, p: b"r" * (MAX + 1)) as (_, errors):
        with SocketClient(sock_path, max_frame=MAX) as c, pytest.raises(PeerClosed):
            c.request(b"x", 5)
        assert wait_until(lambda: len(errors) == 1)
    assert isinstance(errors[0], FrameTooLarge)


def test_a_stalled_frame_is_dropped_after_frame_timeout(sock_path: Path) -> None:
    with serving(sock_path, frame_timeout=0.2) as (_, errors):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.sendall(b"\x10\x00")  # half a header
        s.settimeout(5)
        assert s.recv(16) == b""
        s.close()
        assert wait_until(lambda: len(errors) == 1)
        assert isinstance(errors[0], TransportTimeout)
        with SocketClient(sock_path, max_frame=MAX) as c:  # the server still serves others
            assert c.request(b"ok", 5) == transform(b"ok")


# --- ordering, timeouts, failures -----------------------------------------------------


def test_a_late_response_to_a_timed_out_request_is_never_taken(sock_path: Path) -> None:
    release = threading.Event()

    def slow_first(frame: bytes, peer: PeerCred) -> bytes:
        if frame == b"A":
            release.wait(5)
        return b"answer to " + frame

    with serving(sock_path, slow_first), SocketClient(sock_path) as c:
        with pytest.raises(TransportTimeout):
            c.request(b"A", 0.1)
        release.set()
        time.sleep(0.05)  # the answer to A is on its way (to a connection now dropped)
        assert c.request(b"B", 5) == b"answer to B"
        assert c.request(b"C", 5) == b"answer to C"


def test_endpoint_serve_once_times_out_and_sees_hangups() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    ep = SocketEndpoint(a)
    assert ep.peer.pid == os.getpid()
    t0 = time.perf_counter()
    assert ep.serve_once(lambda f: f, 0.05) is False
    assert 0.05 <= time.perf_counter() - t0 < 0.5
    b.sendall(b"\x01\x00\x00\x00z")
    assert ep.serve_once(lambda f: f * 2, 1) is True
    assert b.recv(16) == b"\x02\x00\x00\x00zz"
    b.close()
    with pytest.raises(PeerClosed):
        ep.serve_once(lambda f: f, 1)
    with pytest.raises(PeerClosed):  # and stays closed
        ep.serve_once(lambda f: f, 1)


def test_a_failing_handler_closes_only_its_connection(sock_path: Path) -> None:
    def h(frame: bytes, peer: PeerCred) -> bytes:
        if frame == b"boom":
            raise ValueError("bug")
        return frame

    with serving(sock_path, h) as (_, errors):
        with SocketClient(sock_path) as bad, pytest.raises(PeerClosed):
            bad.request(b"boom", 5)
        with SocketClient(sock_path) as good:
            assert good.request(b"fine", 5) == b"fine"
        assert wait_until(lambda: len(errors) == 1)
    assert isinstance(errors[0], ValueError)


def test_client_timeout_when_the_server_is_slow(sock_path: Path) -> None:
    with serving(sock_path, slow(0.5)), SocketClient(sock_path) as c:
        t0 = time.perf_counter()
        with pytest.raises(TransportTimeout):
            c.request(b"x", 0.05)
        assert time.perf_counter() - t0 < 0.4


def test_stop_closes_connections_and_clients_see_peer_closed(sock_path: Path) -> None:
    server = SocketServer(sock_path, transform)
    server.start()
    c = SocketClient(sock_path)
    assert c.request(b"x", 5) == transform(b"x")
    assert wait_until(lambda: server.connections == 1)
    t0 = time.perf_counter()
    server.stop()
    assert time.perf_counter() - t0 < 2
    assert server.connections == 0
    with pytest.raises(PeerClosed):
        c.request(b"x", 5)
    with pytest.raises(PeerClosed):  # the reconnect finds nobody
        c.request(b"x", 5)
    c.close()
    server.stop()  # idempotent


def test_a_client_reconnects_to_a_restarted_server(sock_path: Path) -> None:
    with serving(sock_path):
        c = SocketClient(sock_path)
        assert c.request(b"1", 5) == transform(b"1")
    with serving(sock_path):
        with pytest.raises(PeerClosed):
            c.request(b"2", 5)  # the old connection died with the old server
        assert c.request(b"3", 5) == transform(b"3")
        c.close()


def test_closing_a_client_wakes_its_waiting_caller(sock_path: Path) -> None:
    with serving(sock_path, slow(0.5)), SocketClient(sock_path) as c:
        threading.Timer(0.1, c.close).start()
        t0 = time.perf_counter()
        with pytest.raises(PeerClosed):
            c.request(b"x", 10)
        assert time.perf_counter() - t0 < 0.4
        with pytest.raises(PeerClosed):
            c.request(b"x", 10)


def test_no_server_is_peer_closed(sock_path: Path) -> None:
    with pytest.raises(PeerClosed):
        SocketClient(sock_path)


def test_start_refuses_a_live_server_and_replaces_a_stale_socket(sock_path: Path) -> None:
    with serving(sock_path):
        with pytest.raises(TransportError, match="already listening"):
            SocketServer(sock_path, transform).start()
        assert SocketClient(sock_path).request(b"x", 5) == transform(b"x")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock_path))  # a socket file left by a server that died
    dead.close()
    with serving(sock_path), SocketClient(sock_path) as c:
        assert c.request(b"y", 5) == transform(b"y")


def test_start_never_removes_a_regular_file(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(TransportError, match="not a socket"):
        SocketServer(sock_path, transform).start()
    assert sock_path.read_text() == "precious"


# --- asyncio --------------------------------------------------------------------------


def test_async_round_trips_and_concurrent_tasks(sock_path: Path) -> None:
    async def main(c: SocketClient) -> None:
        for n in (0, 9, MAX):
            f = os.urandom(n)
            assert await c.arequest(f, 5) == transform(f)
        frames = [f"task {i}".encode() for i in range(40)]
        got = await asyncio.gather(*(c.arequest(f, 10) for f in frames))
        assert got == [transform(f) for f in frames]

    with serving(sock_path), SocketClient(sock_path, max_frame=MAX) as c:
        asyncio.run(main(c))
        asyncio.run(main(c))  # a second event loop gets its own connection


def test_async_timeout_then_in_step_again(sock_path: Path) -> None:
    release = threading.Event()

    def slow_first(frame: bytes, peer: PeerCred) -> bytes:
        if frame == b"A":
            release.wait(5)
        return b"answer to " + frame

    async def main(c: SocketClient) -> None:
        with pytest.raises(TransportTimeout):
            await c.arequest(b"A", 0.1)
        release.set()
        await asyncio.sleep(0.05)
        assert await c.arequest(b"B", 5) == b"answer to B"
        with pytest.raises(FrameTooLarge):
            await c.arequest(b"x" * (MAX + 1), 5)

    with serving(sock_path, slow_first), SocketClient(sock_path, max_frame=MAX) as c:
        asyncio.run(main(c))


def test_async_oversize_response_length_and_peer_closed(sock_path: Path) -> None:
    async def main(c: SocketClient) -> None:
        with pytest.raises(FrameTooLarge):
            await c.arequest(b"x", 5)

    with fake_server(sock_path, struct.pack("<I", MAX + 1)):
        c = SocketClient(sock_path, max_frame=MAX)
        c._drop()  # the fake serves one connection at a time: leave it to the async path
        asyncio.run(main(c))
        c.close()

    async def gone(c: SocketClient) -> None:
        with pytest.raises(PeerClosed):
            await c.arequest(b"x", 5)

    with serving(sock_path):
        c = SocketClient(sock_path)
    asyncio.run(gone(c))
    c.close()


# --- separate processes ---------------------------------------------------------------


def _serve_in_child(path: str, ready: MpEvent, stop: MpEvent) -> None:
    with SocketServer(path, transform):
        ready.set()
        stop.wait(60)


def test_server_in_another_process(sock_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_serve_in_child, args=(str(sock_path), ready, stop))
    child.start()
    try:
        assert ready.wait(30)
        with SocketClient(sock_path, max_frame=MAX) as c:
            for n in (0, 1, 100, MAX - 1) * 10:
                f = os.urandom(n)
                assert c.request(f, 10) == transform(f)
    finally:
        stop.set()
        child.join(10)
    assert child.exitcode == 0
