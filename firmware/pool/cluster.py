"""A local etcd cluster on loopback: ``slicefab pool up``, the ``etcd`` tests and the pool
benchmark start one with :class:`LocalEtcd` and always stop it (``with`` or ``stop()``).

Each member listens on 127.0.0.1 only, on free ports picked by the kernel, with its data
directory under the caller's directory. Timings are tightened for a loopback cluster
(heartbeat 50 ms, election 500 ms) so that losing the leader costs about half a second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import requests

from firmware.errors import ConfigError, SlicefabError

START_TIMEOUT_S = 30.0


def etcd_binary() -> str:
    """The ``etcd`` server binary (Debian ``etcd-server``). Raises ConfigError if absent."""
    path = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if path is None:
        raise ConfigError(
            "the etcd server is not installed",
            expected="Debian package etcd-server (`apt-get install -y etcd-server`, "
            "or `make setup`, which reads .ci/apt-packages)",
        )
    return path


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalEtcd:
    """``members`` etcd members on loopback, state under ``directory``."""

    directory: Path
    members_count: int = 3
    members: list[Member] = field(default_factory=list)
    #: run the members in their own session, to outlive the caller (``slicefab pool up``)
    detach: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.members_count <= 7:
            raise ConfigError(
                f"etcd members: {self.members_count} is out of range",
                field="members",
                limit="1..7",
                expected="an odd number such as 1 or 3",
            )

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self) -> LocalEtcd:
        """Start every member and wait until the cluster answers a linearizable read.
        On any failure, stops what was started and raises SlicefabError."""
        binary = etcd_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * self.members_count)
        self.members = [
            Member(
                f"etcd{i}",
                ports[2 * i],
                ports[2 * i + 1],
                self.directory / f"etcd{i}.data",
                self.directory / f"etcd{i}.log",
            )
            for i in range(self.members_count)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        try:
            for m in self.members:
                self._spawn(binary, m, initial)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, binary: str, m: Member, initial: str) -> None:
        args = [
            binary,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"slicefab-{os.getpid()}-{self.members[0].client_port}",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        with open(m.log, "ab") as log:
            m.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=self.detach,
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until a quorum answers (a linearizable range through a running member)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for m in self.members:
                if m.process is not None and m.process.poll() is not None:
                    tail = m.log.read_text(errors="replace")[-2000:] if m.log.exists() else ""
                    raise SlicefabError(
                        f"etcd member {m.name} exited with {m.process.returncode}: {tail}"
                    )
            for m in self.members:
                if not m.running:
                    continue
                try:
                    r = requests.post(
                        m.client_url + "/v3/kv/range", json={"key": "AA=="}, timeout=1.0
                    )
                    if r.status_code == 200:
                        return
                    last = f"{m.name}: HTTP {r.status_code} {r.text[:200]}"
                except requests.RequestException as e:
                    last = f"{m.name}: {e}"
            time.sleep(0.1)
        raise SlicefabError(f"etcd cluster not ready after {timeout} s ({last})")

    def kill(self, index: int) -> None:
        """SIGKILL one member (the failure tests)."""
        m = self.members[index]
        if m.process is not None and m.process.poll() is None:
            m.process.kill()
            m.process.wait(10)

    def stop(self, grace: float = 1.0) -> None:
        """Stop every member: SIGTERM, then SIGKILL after ``grace`` s. Members stopped
        together spend ~6 s trying to hand leadership over to each other; etcd is
        crash-safe (raft entries are fsynced before they are acknowledged), so the SIGKILL
        loses nothing. Safe to call twice."""
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                m.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for m in self.members:
            if m.process is None:
                continue
            try:
                m.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                m.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.process.wait(5)

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
