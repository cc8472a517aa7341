"""The VM launcher: boot a Debian kernel with virtme-ng over the host's root file system,
with the offload device's hardware composed in (:mod:`slicefab_qemu.config`), and take it
down again without leaving a process, a socket or a file behind.

Python API (what the tests and ``slicefab vm up/down/list`` use)::

    with Vm(VmConfig("vm-a"), state_dir=state, mailbox=mbox, credential=cred) as vm:
        vm.agent.sh("cat /proc/meminfo")        # the QEMU guest agent
        vm.runner.call("allocate", memory="128 MiB")   # hostlib in the guest
        vm.qmp.execute("query-status")         # QEMU's monitor
    # down: QMP quit, then SIGTERM/SIGKILL to the process group if need be, run dir removed

Everything a running VM has on the host is in its run directory, ``<state>/run/<vm>/``:
the QMP, guest-agent and runner sockets, ``vm.json`` (who runs it: the process group,
QEMU's pid, its config), the console log, the credential handed to the guest, and
virtme-ng's temporary files (``TMPDIR``). ``down`` removes the directory.

Processes: ``vng`` is started in a new session, so it, the shell and ``virtme-run`` it
starts, and QEMU (which ``virtme-run`` forks) share one process group whose id is
``vng``'s pid; ``down`` signals exactly that group, and only if QEMU did not quit.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slicefab_qemu.config import (
    BOOT_TIMEOUT_S,
    RunPaths,
    VmConfig,
    default_kernel,
    guest_command,
    qemu_args,
    run_paths,
    vng_argv,
)
from slicefab_qemu.errors import VmError
from slicefab_qemu.qmp import GuestAgent, QmpChannel
from slicefab_qemu.runner_client import GuestRunner

QEMU = "qemu-system-x86_64"
LOG_TAIL = 3000


def _live_stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, ...);
    empty if ``pid`` does not run. A zombie does not run: a container's init may never
    reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []
    return fields if fields and fields[0] not in ("Z", "X") else []


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs."""
    return bool(_live_stat(pid))


def _group_alive(pgid: int) -> bool:
    """Whether any live process is in process group ``pgid``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _live_stat(entry)
            if len(fields) > 2 and int(fields[2]) == pgid:
                return True
    return False


@dataclass
class VmRecord:
    """``vm.json``: a running VM as another process (``slicefab vm down``, the firmware's
    QMP backend) finds it."""

    name: str
    instance: str  # new at every boot
    pgid: int  # the process group: vng, virtme-run and QEMU
    qemu_pid: int  # 0 until QEMU wrote its pid file
    started: float  # time.time() at launch
    boot_s: float  # launch to guest agent answering; 0 while booting
    mailbox: str
    config: dict[str, Any]
    run_dir: str

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.run_dir))

    @property
    def vm_config(self) -> VmConfig:
        return VmConfig.from_dict(self.config)

    @property
    def running(self) -> bool:
        return _alive(self.qemu_pid) if self.qemu_pid else _group_alive(self.pgid)

    def save(self) -> None:
        path = self.paths.record
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> VmRecord:
        """Raises VmError if the file is missing or malformed."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise VmError(f"cannot read VM record {path}: {e}") from e


def list_records(state_dir: Path) -> list[VmRecord]:
    """Every VM with a run directory under ``state_dir`` (running or left behind)."""
    root = Path(state_dir).absolute() / "run"
    out: list[VmRecord] = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            with contextlib.suppress(VmError):
                out.append(VmRecord.load(d / "vm.json"))
    return out


def find_record(state_dir: Path, name: str) -> VmRecord | None:
    path = run_paths(state_dir, name).record
    if not path.exists():
        return None
    return VmRecord.load(path)


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no console log)"
    return data[-n:].decode(errors="replace")


def _search_path() -> str:
    """``PATH`` with this Python's bin directory first (the venv's ``vng``)."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=_search_path())


def _precompile() -> None:
    """Write the bytecode of what the guest imports (hostlib, abi, the guest runner).

    The guest's view of the file system is read-only, so Python in the guest can use
    ``__pycache__`` but never write it; without it every guest process compiles hostlib
    from source, which costs seconds under TCG. An editable install leaves the project's
    own packages uncompiled (and PYTHONDONTWRITEBYTECODE may be set), hence this."""
    import abi
    import hostlib
    import slicefab_qemu

    for pkg in (abi, hostlib, slicefab_qemu):
        compileall.compile_dir(os.path.dirname(pkg.__file__ or ""), quiet=2)


class Vm:
    """One VM: :meth:`up` boots it, :meth:`down` stops it and removes every trace; as a
    context manager, ``down`` runs even when the body (or ``up`` itself) fails."""

    def __init__(
        self,
        config: VmConfig,
        *,
        state_dir: Path,
        mailbox: Path,
        credential: Path,
        python: str = sys.executable,
    ) -> None:
        config.validate()
        self.config = config
        self.state_dir = Path(state_dir).absolute()
        self.mailbox = Path(mailbox).absolute()
        self.credential = Path(credential)
        self.python = python
        self.run = run_paths(self.state_dir, config.name)
        self.record: VmRecord | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QmpChannel | None = None
        self._agent: GuestAgent | None = None
        self._runner: GuestRunner | None = None

    @classmethod
    def attach(cls, state_dir: Path, name: str) -> Vm:
        """The VM ``name`` as another process started it (``slicefab vm up``), to reach
        its monitor, agent or runner, or to stop it. Raises VmError if it has no record."""
        record = find_record(state_dir, name)
        if record is None:
            raise VmError(f"VM {name} is not running (no {run_paths(state_dir, name).record})")
        vm = cls(
            record.vm_config,
            state_dir=state_dir,
            mailbox=Path(record.mailbox),
            credential=record.paths.credential,
        )
        vm.record = record
        return vm

    # ------------------------------------------------------------------ up

    def up(self, timeout: float = BOOT_TIMEOUT_S) -> float:
        """Boot the VM; returns the seconds from launch until its guest agent answered.

        Raises RequestError (bad config or paths), VmError (already running, a tool is
        missing, the mailbox is unusable, or the guest did not come up: the message ends
        with the console log's tail). On any failure everything started is stopped."""
        self.run.check()
        existing = find_record(self.state_dir, self.config.name)
        if existing is not None and existing.running:
            raise VmError(
                f"VM {self.config.name} is already running (process group {existing.pgid}); "
                f"`slicefab vm down {self.config.name}` first",
                vm=self.config.name,
            )
        shutil.rmtree(self.run.root, ignore_errors=True)  # what a crashed launcher left
        vng = _which("vng")
        if vng is None:
            raise VmError("virtme-ng's `vng` is not installed (pip install virtme-ng)")
        if _which(QEMU) is None:
            raise VmError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
        try:
            size = self.mailbox.stat().st_size
        except OSError as e:
            raise VmError(
                f"mailbox {self.mailbox}: {e.strerror}; provision the VM first "
                f"(`slicefab vm add {self.config.name}`)"
            ) from None
        kernel = Path(self.config.kernel) if self.config.kernel else default_kernel()
        if not self.credential.is_file():
            raise VmError(f"credential {self.credential} does not exist (`slicefab vm add`)")
        _precompile()
        qemu = qemu_args(self.config, self.run, self.mailbox, size)
        argv = vng_argv(
            vng, self.config, kernel, qemu, guest_command(self.run, self.state_dir, self.python)
        )
        try:
            return self._launch(argv, timeout)
        except BaseException:
            self.down()
            raise

    def _launch(self, argv: list[str], timeout: float) -> float:
        for d in (self.run.root, self.run.guest, self.run.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copyfile(self.credential, self.run.credential)
        os.chmod(self.run.credential, 0o600)
        env = dict(os.environ)
        env["PATH"] = _search_path()
        env["TMPDIR"] = str(self.run.tmp)
        started = time.time()
        t0 = time.monotonic()
        with open(self.run.log, "wb") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd="/",
            )
        self.record = VmRecord(
            name=self.config.name,
            instance=uuid.uuid4().hex,
            pgid=self._proc.pid,
            qemu_pid=0,
            started=started,
            boot_s=0.0,
            mailbox=str(self.mailbox),
            config=self.config.to_dict(),
            run_dir=str(self.run.root),
        )
        self.record.save()
        self._wait_booted(t0 + timeout)
        boot_s = time.monotonic() - t0
        self.record.qemu_pid = self._qemu_pid()
        self.record.boot_s = boot_s
        self.record.save()
        return boot_s

    def _failed(self, why: str) -> VmError:
        return VmError(
            f"VM {self.config.name} did not come up: {why}\n--- console log "
            f"({self.run.log}) ---\n{_tail(self.run.log)}",
            vm=self.config.name,
        )

    def _wait_booted(self, deadline: float) -> None:
        """Wait for QMP, then for the guest agent (started last by the guest's init)."""
        assert self._proc is not None
        while not self.run.qmp.exists():
            if self._proc.poll() is not None:
                raise self._failed(f"vng exited with status {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise self._failed("QEMU did not open its QMP socket")
            time.sleep(0.05)
        self._qmp = QmpChannel(self.run.qmp, name=f"qmp-{self.config.name}")
        self._qmp.connect(timeout=max(1.0, deadline - time.monotonic()))
        agent = GuestAgent(self.run.agent)
        self._agent = agent
        agent.connect(timeout=max(1.0, deadline - time.monotonic()))
        # One ping, answered once qemu-ga runs: the request waits in the serial port
        # (QEMU does not read a guest port's chardev until the guest opens the port).
        ping = agent.channel.submit("guest-ping")
        while True:
            if self._proc.poll() is not None:
                ping.cancel()
                raise self._failed(f"vng exited with status {self._proc.returncode}")
            if time.monotonic() > deadline:
                ping.cancel()
                raise self._failed("the guest agent did not answer in time")
            try:
                ping.result(timeout=0.2)
                return
            except FutureTimeout:
                continue
            except Exception as e:
                raise self._failed(f"the guest agent failed: {e!r}") from e

    def _qemu_pid(self) -> int:
        try:
            return int(self.run.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    # ------------------------------------------------------------------ access

    @property
    def qmp(self) -> QmpChannel:
        """QEMU's monitor (connected). Raises VmError if the VM is not up."""
        if self._qmp is None:
            if self.record is None:
                raise VmError(f"VM {self.config.name} is not up")
            self._qmp = QmpChannel(self.run.qmp, name=f"qmp-{self.config.name}")
            self._qmp.connect()
        return self._qmp

    @property
    def agent(self) -> GuestAgent:
        """The guest agent (connected). Raises VmError if the VM is not up."""
        if self._agent is None:
            if self.record is None:
                raise VmError(f"VM {self.config.name} is not up")
            self._agent = GuestAgent(self.run.agent)
            self._agent.connect(10.0)
        return self._agent

    @property
    def runner(self) -> GuestRunner:
        """The Slicefab guest runner (hostlib in the guest). Raises VmError if not up."""
        if self._runner is None:
            if self.record is None:
                raise VmError(f"VM {self.config.name} is not up")
            self._runner = GuestRunner(self.run.runner)
            self._runner.connect()
        return self._runner

    def detach(self) -> None:
        """Close this process's connections and leave the VM running (``vm up``)."""
        for closer in (self._runner, self._agent, self._qmp):
            if closer is not None:
                closer.close()
        self._runner = self._agent = self._qmp = None
        self._proc = None

    # ------------------------------------------------------------------ down

    def down(self, timeout: float = 30.0) -> None:
        """Stop the VM and remove its run directory. Never raises for a VM that is
        already gone; raises VmError only if its processes survive SIGKILL."""
        pgid = self._proc.pid if self._proc is not None else (
            self.record.pgid if self.record is not None else 0
        )
        for closer in (self._runner, self._agent):
            if closer is not None:
                closer.close()
        self._runner = self._agent = None
        try:
            if self._qmp is None and self.run.qmp.exists():
                with contextlib.suppress(VmError):
                    self._qmp = QmpChannel(self.run.qmp, name=f"qmp-{self.config.name}")
                    self._qmp.connect(timeout=2.0)
            if self._qmp is not None:
                with contextlib.suppress(VmError):
                    self._qmp.execute("quit", timeout=5.0)
        finally:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
        if pgid:
            _stop_group(pgid, self._proc, timeout)
        self._proc = None
        self.record = None
        shutil.rmtree(self.run.root, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last VM of this state directory
            self.run.root.parent.rmdir()

    def __enter__(self) -> Vm:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _stop_group(pgid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Wait for process group ``pgid`` to end; SIGTERM, then SIGKILL it if it does not.
    Raises VmError if it survives SIGKILL."""

    def gone(wait: float) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
            if not _group_alive(pgid):
                return True
            time.sleep(0.05)
        return not _group_alive(pgid)

    if gone(timeout):
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if gone(wait):
            return
    raise VmError(f"process group {pgid} survived SIGKILL")


def stop(state_dir: Path, name: str, timeout: float = 30.0) -> bool:
    """``slicefab vm down NAME``: stop a VM started by another process; False if it was
    not running (a stale run directory is removed all the same). Raises VmError only if
    its processes survive SIGKILL."""
    try:
        vm = Vm.attach(state_dir, name)
    except VmError:
        shutil.rmtree(run_paths(state_dir, name).root, ignore_errors=True)
        return False
    assert vm.record is not None
    was_running = vm.record.running
    vm.down(timeout)
    return was_running
