"""The pool's etcd client: etcd3gw over etcd's JSON gateway, across every member.

etcd3gw speaks to one member. A pool must keep working when a member dies, so :class:`Etcd`
holds one etcd3gw client per member and moves to the next member when the current one
refuses the connection, times out or answers 5xx (a member that lost its quorum).

The gateway's path prefix depends on the server's version: ``/v3/`` from etcd 3.4 (Debian
12 ships 3.4.23), ``/v3beta/`` on 3.3, ``/v3alpha/`` before. etcd3gw would discover it with
an extra ``GET /version`` in *each* client, lazily, on the first request; and that
discovery is not retried on another member. We discover it once, from whichever member
answers, refuse servers older than 3.3 (no ``/v3beta`` transactions with the compare
targets we use), and hand the path to every client (:func:`gateway_path`).

Watches are our own reader of the gateway's stream (``POST <path>watch``, one JSON object
per line): etcd3gw's ``Watcher`` parses the stream in a worker thread that swallows errors,
so a member that dies mid-watch looks like silence. Ours raises :class:`WatchLost`, and the
caller re-watches from the next revision on another member (:meth:`Etcd.watch`).

Values are JSON documents; the gateway base64-encodes keys and values and writes int64 as
strings, which :class:`KV` undoes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
)

from firmware.errors import ConfigError, SlicefabError

T = TypeVar("T")

#: how long one HTTP request may take before the member is given up for the next one
REQUEST_TIMEOUT_S = 5.0
#: how long a call keeps trying members (an election after a leader dies takes ~1 s)
FAILOVER_DEADLINE_S = 15.0
#: a watch with no event for this long is re-created (also notices a silently dead member)
WATCH_IDLE_S = 10.0


class PoolUnavailable(SlicefabError):
    """No etcd member answered in time (or the cluster has no quorum). Its code is the
    generic ``error``: every firmware error code has a CCI wire code (abi/retcodes.py)."""


class WatchLost(Exception):
    """The watch stream ended (member gone, idle time-out, or cancelled): re-watch from
    :attr:`next_revision` on another member."""

    def __init__(self, next_revision: int, reason: str) -> None:
        super().__init__(reason)
        self.next_revision = next_revision


class Compacted(Exception):
    """The revision a watch asked for was compacted: re-read the range, then watch."""


def gateway_path(version: str) -> str:
    """The JSON gateway's path prefix for an etcd server of ``version`` (``"3.4.23"``).

    Raises ConfigError for a version older than 3.3 or one that does not parse."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        raise ConfigError(
            f"etcd version {version!r} does not parse", expected="MAJOR.MINOR.PATCH"
        ) from None
    if (major, minor) >= (3, 4):
        return "/v3/"
    if (major, minor) == (3, 3):
        return "/v3beta/"
    raise ConfigError(
        f"etcd {version} is too old for the pool: its JSON gateway lacks the v3 transaction "
        "API the pool uses",
        limit="3.3",
        expected="etcd >= 3.3 (Debian 12's etcd-server is 3.4)",
    )


def parse_endpoints(text: str | list[str]) -> list[str]:
    """``"http://127.0.0.1:2379,http://127.0.0.1:2479"`` → a list of base URLs.

    Raises ConfigError naming the bad endpoint."""
    items = text if isinstance(text, list) else [e for e in text.split(",") if e.strip()]
    out = []
    for raw in items:
        e = raw.strip().rstrip("/")
        u = urlsplit(e)
        if u.scheme != "http" or not u.hostname or u.port is None or u.path:
            raise ConfigError(
                f"pool endpoint {raw!r} is not an etcd client URL",
                field="pool",
                expected="http://HOST:PORT[,http://HOST:PORT...]",
            )
        out.append(e)
    if not out:
        raise ConfigError("no pool endpoint given", field="pool", expected="http://HOST:PORT")
    return out


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with ``prefix`` (its last byte + 1)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


@dataclass(frozen=True)
class KV:
    """One key as the gateway returns it (revisions are etcd's, ints)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_gateway(cls, kv: dict[str, Any]) -> KV:
        return cls(
            key=_unb64(kv["key"]).decode(),
            value=_unb64(kv.get("value", "")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class Event:
    kind: str  # "PUT" or "DELETE"
    kv: KV


# -------------------------------------------------------------- transaction operations


def put(key: str, value: Any, lease: int = 0) -> dict[str, Any]:
    """A put of ``value`` (JSON-encoded) for a transaction; ``lease`` 0 is no lease."""
    op: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value, sort_keys=True))}
    if lease:
        op["lease"] = str(lease)
    return {"request_put": op}


def delete(key: str, *, prefix: bool = False) -> dict[str, Any]:
    op = {"key": _b64(key)}
    if prefix:
        op["range_end"] = _b64(prefix_end(key))
    return {"request_delete_range": op}


def mod_revision_is(key: str, revision: int) -> dict[str, Any]:
    """Compare: the key was last modified at ``revision`` (0: the key does not exist)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(revision)}


def created_at(key: str, revision: int) -> dict[str, Any]:
    """Compare: the key was created at ``revision`` (and not deleted and created again
    since: a device that left and came back has a new key; 0: it does not exist)."""
    return {
        "key": _b64(key),
        "result": "EQUAL",
        "target": "CREATE",
        "create_revision": str(revision),
    }


def absent(key: str) -> dict[str, Any]:
    """Compare: the key does not exist."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}


class Etcd:
    """A client of an etcd cluster through the JSON gateway of any of its members.

    Not shared between threads: give each thread its own (they are cheap)."""

    def __init__(
        self,
        endpoints: str | list[str],
        *,
        timeout: float = REQUEST_TIMEOUT_S,
        deadline: float = FAILOVER_DEADLINE_S,
        cancel: threading.Event | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self.deadline = deadline
        #: once set, calls stop trying other members (a daemon shutting down)
        self.cancel = cancel
        self._path: str | None = None
        self._clients: list[Etcd3Client] = []
        self._current = 0
        self.failovers = 0  # times a call moved to another member (tests, benches)

    # ------------------------------------------------------------------ plumbing

    def _client(self, i: int) -> Etcd3Client:
        if not self._clients:
            self._clients = [self._make(e) for e in self.endpoints]
        return self._clients[i]

    def _make(self, endpoint: str) -> Etcd3Client:
        u = urlsplit(endpoint)
        assert u.hostname is not None and u.port is not None
        return Etcd3Client(
            host=u.hostname, port=u.port, timeout=self.timeout, api_path=self._path or "/v3/"
        )

    def _discover(self) -> None:
        """Find the gateway path from the first member that answers ``GET /version``."""
        deadline = time.monotonic() + self.deadline
        last: Exception | None = None
        while time.monotonic() < deadline:
            for e in self.endpoints:
                try:
                    r = requests.get(e + "/version", timeout=self.timeout)
                    r.raise_for_status()
                    version = str(r.json()["etcdserver"])
                except (requests.RequestException, KeyError, ValueError) as ex:
                    last = ex
                    continue
                self._path = gateway_path(version)
                self.server_version = version
                for c in self._clients:
                    c._api_path = self._path
                return
            time.sleep(0.1)
        raise PoolUnavailable(
            f"no etcd member answered at {', '.join(self.endpoints)}: {last}",
            endpoints=self.endpoints,
        )

    @property
    def api_path(self) -> str:
        if self._path is None:
            self._discover()
        assert self._path is not None
        return self._path

    def _call(self, fn: Callable[[Etcd3Client], T]) -> T:
        """``fn`` on the current member; on a connection failure, a time-out or a 5xx, on the
        next one, until :data:`FAILOVER_DEADLINE_S`. Raises PoolUnavailable."""
        _ = self.api_path
        deadline = time.monotonic() + self.deadline
        tries = 0
        while True:
            client = self._client(self._current)
            try:
                return fn(client)
            except (ConnectionFailedError, ConnectionTimeoutError, InternalServerError) as e:
                if isinstance(e, InternalServerError) and "not found" in (e.detail_text or ""):
                    raise PoolUnavailable(f"etcd: {e.detail_text}") from e  # not transient
                tries += 1
                self._current = (self._current + 1) % len(self.endpoints)
                self.failovers += 1
                if time.monotonic() > deadline or (self.cancel and self.cancel.is_set()):
                    raise PoolUnavailable(
                        f"etcd unavailable after {tries} attempts: {e.detail_text or e!r}",
                        endpoints=self.endpoints,
                    ) from e
                if tries % len(self.endpoints) == 0:
                    time.sleep(min(0.05 * tries, 0.5))  # every member refused: wait a bit
            except Etcd3Exception as e:
                raise PoolUnavailable(f"etcd refused the request: {e.detail_text}") from e

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        def go(c: Etcd3Client) -> dict[str, Any]:
            answer: dict[str, Any] = c.post(c.get_url(path), json=body)
            return answer

        return self._call(go)

    # ------------------------------------------------------------------ key-value

    def get(self, key: str) -> KV | None:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def range(self, key: str, *, prefix: bool = False) -> tuple[list[KV], int]:
        """The keys (``key`` itself, or every key under it), and the store's revision at
        which they were read (a watch continues from revision + 1)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        r = self._post("kv/range", body)
        kvs = [KV.from_gateway(kv) for kv in r.get("kvs", [])]
        return kvs, int(r["header"]["revision"])

    def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, int]:
        """One transaction: ``success`` if every comparison holds, else ``failure``.
        Returns (succeeded, revision)."""
        r = self._post("kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(r.get("succeeded", False)), int(r["header"]["revision"])

    def put(self, key: str, value: Any, lease: int = 0) -> int:
        _ok, rev = self.txn([], [put(key, value, lease)])
        return rev

    def delete(self, key: str, *, prefix: bool = False) -> int:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        r = self._post("kv/deleterange", body)
        return int(r.get("deleted", 0))

    # ------------------------------------------------------------------ leases

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        r = self._post("lease/grant", {"TTL": str(ttl), "ID": "0"})
        return int(r["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh a lease; returns its remaining TTL, or -1 if it has already expired."""
        r = self._post("lease/keepalive", {"ID": str(lease)})
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        """Revoke a lease: every key attached to it is deleted (an expired lease is fine)."""
        try:
            self._post("kv/lease/revoke", {"ID": str(lease)})
        except PoolUnavailable as e:
            if "lease not found" not in str(e):
                raise

    # ------------------------------------------------------------------ watch

    def watch(self, prefix: str, start_revision: int, stop: threading.Event) -> Iterator[Event]:
        """Every event under ``prefix`` from ``start_revision`` on, across member failures,
        until ``stop`` is set (checked between streams and at each event). Raises
        Compacted if ``start_revision`` is no longer in etcd's history."""
        next_rev = start_revision
        while not stop.is_set():
            try:
                for ev, rev in self._watch_stream(prefix, next_rev, stop):
                    next_rev = rev + 1
                    yield ev
            except WatchLost as lost:
                next_rev = max(next_rev, lost.next_revision)
                if stop.is_set():
                    return
                if "idle" not in str(lost):
                    self._current = (self._current + 1) % len(self.endpoints)
                    self.failovers += 1
                    time.sleep(0.05)

    def _watch_stream(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[tuple[Event, int]]:
        path = self.api_path
        endpoint = self.endpoints[self._current]
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        session = requests.Session()
        try:
            try:
                resp = session.post(
                    endpoint + path + "watch",
                    json=body,
                    stream=True,
                    timeout=(self.timeout, WATCH_IDLE_S),
                )
            except requests.RequestException as e:
                raise WatchLost(start_revision, f"cannot watch on {endpoint}: {e}") from None
            if resp.status_code != 200:
                raise WatchLost(start_revision, f"{endpoint} answered {resp.status_code}")
            closer = threading.Thread(
                target=_close_when, args=(stop, resp), daemon=True, name="etcd-watch-stop"
            )
            closer.start()
            try:
                for line in resp.iter_lines():
                    if stop.is_set():
                        return
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result")
                    if result is None:
                        raise WatchLost(start_revision, f"{endpoint}: watch error {line[:200]!r}")
                    if int(result.get("compact_revision", 0)) > 0:
                        raise Compacted(
                            f"revision {start_revision} is compacted "
                            f"(oldest kept: {result['compact_revision']})"
                        )
                    if result.get("canceled"):
                        raise WatchLost(start_revision, f"{endpoint} cancelled the watch")
                    for raw in result.get("events", []):
                        kv = KV.from_gateway(raw["kv"])
                        yield Event(raw.get("type", "PUT"), kv), kv.mod_revision
            except requests.exceptions.ConnectionError as e:
                # also a read time-out (requests raises it as ConnectionError mid-stream)
                if stop.is_set():
                    return
                idle = "timed out" in str(e).lower()
                raise WatchLost(
                    start_revision, ("idle" if idle else f"{endpoint} went away: {e}")
                ) from None
            except (requests.RequestException, AttributeError, ValueError, OSError) as e:
                # AttributeError/ValueError: urllib3 reading a response closed by _close_when
                if stop.is_set():
                    return
                raise WatchLost(start_revision, f"{endpoint} went away: {e!r}") from None
            finally:
                resp.close()
            if not stop.is_set():
                raise WatchLost(start_revision, f"{endpoint} ended the watch stream")
        finally:
            session.close()


def _close_when(stop: threading.Event, resp: requests.Response) -> None:
    """Close a watch stream once ``stop`` is set (unblocks the reader), or once it ends."""
    while not stop.wait(0.2):
        if resp.raw is None or resp.raw.closed:
            return
    # closing the response does not wake a thread blocked in recv(); shutting the socket
    # down does (through a duplicate of its descriptor, so the original stays valid)
    with contextlib.suppress(Exception):
        fd = resp.raw._fp.fileno()
        dup = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()
    resp.close()
