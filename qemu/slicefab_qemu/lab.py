"""A firmware daemon and its VMs on one state directory, for the integration tests and
``slicefab bench qemu``: exactly what an administrator types (``slicefab serve``,
``slicefab vm add``), run as child processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slicefab_qemu.config import VmConfig
from slicefab_qemu.errors import VmError
from slicefab_qemu.launcher import Vm


def slicefab(state_dir: Path, *args: str, timeout: float = 60.0) -> Any:
    """Run one ``slicefab ... --json`` command on ``state_dir``; its JSON output.

    Raises VmError with its stderr if it exits non-zero."""
    r = subprocess.run(
        [sys.executable, "-m", "firmware.cli", *args, "--state-dir", str(state_dir), "--json"],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if r.returncode != 0:
        raise VmError(f"slicefab {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


class Firmware:
    """``slicefab serve`` on ``state_dir`` (with its QEMU backend), until :meth:`close`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log = self.state_dir.parent / f"{self.state_dir.name}.serve.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "firmware.cli", "serve", "--state-dir", str(state_dir)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while not (self.state_dir / "admin.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise VmError(f"slicefab serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def provision(self, vm: str) -> tuple[Path, Path]:
        """``slicefab vm add VM``: (mailbox, credential file)."""
        r = slicefab(self.state_dir, "vm", "add", vm)
        return Path(r["mailbox"]), Path(r["credential"])

    def vm(self, config: VmConfig) -> Vm:
        """A launcher for a VM provisioned here (not started)."""
        mailbox, credential = self.provision(config.name)
        return Vm(config, state_dir=self.state_dir, mailbox=mailbox, credential=credential)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
