"""The ``slicefab`` command line, run as a user would: in-process on a state directory, and
against a ``slicefab serve`` daemon — including SIGKILL right after an acknowledged
allocation, and a restart that recovers the slice and re-programs the fabric."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-m", "firmware.cli"]


def run(
    *args: str, state: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, *args]
    if state is not None:
        cmd += ["--state-dir", str(state)]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "160"}
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def run_json(*args: str, state: Path | None = None) -> Any:
    return json.loads(run(*args, "--json", state=state).stdout)


class Daemon:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.proc: subprocess.Popen[str] | None = None

    def start(self, *extra: str, env: dict[str, str] | None = None) -> str:
        """Start ``slicefab serve`` (``env``: variables set on top of this process's)."""
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--state-dir", str(self.state), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once the socket is listening
        if "serving" not in line:
            self.stop()
            raise AssertionError(f"daemon did not start: {line}")
        return line

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "state")
    try:
        yield d
    finally:
        d.stop()  # always: no daemon outlives its test


def test_device_show(tmp_path: Path) -> None:
    dev = run_json("device", "show")
    assert dev["cores"]["total"] == 64 and dev["memory"]["granules"] == 32768
    assert [e["name"] for e in dev["pcie"]["endpoints"]] == ["nvme0", "nvme1"]
    assert "sf-dpu0" in run("device", "show").stdout


def test_bad_device_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "dev.toml"
    bad.write_text("[device]\nname = 'x'\n[cores]\nclusters = 0\n")
    p = run("device", "show", "--device", str(bad), check=False)
    assert p.returncode == 1
    assert "cores.clusters: 0 is out of range [1, 64]" in p.stderr


def test_in_process_alloc_resize_free(tmp_path: Path) -> None:
    st = tmp_path / "state"
    s = run_json(
        "alloc",
        "--owner",
        "vm-a",
        "--cores",
        "4",
        "--same-cluster",
        "--memory",
        "4GiB",
        "--lanes",
        "4",
        "--endpoint",
        "nvme0",
        "--priority",
        "5",
        "--guaranteed",
        "10Gbit/s",
        state=st,
    )
    assert s["state"] == "active" and len(s["alloc"]["cores"]) == 4
    r = run_json("resize", str(s["id"]), "--memory", "6GiB", "--cores", "6", state=st)
    assert r["memory"] == "6 GiB" and len(r["alloc"]["cores"]) == 6
    listed = run_json("slices", "list", state=st)
    assert [x["id"] for x in listed] == [s["id"]]
    fabric = run_json("fabric", "show", state=st)
    port = s["alloc"]["ports"][0]
    assert fabric["permission"][port] == 1 << port
    assert run("check", state=st).returncode == 0
    run("free", str(s["id"]), state=st)
    assert run_json("slices", "list", state=st) == []
    table = run("slices", "list", state=st).stdout
    assert "Slices" in table


def test_slice_file(tmp_path: Path) -> None:
    f = tmp_path / "web.toml"
    f.write_text(
        'owner = "vm-web"\nname = "web"\nports = 2\n[memory]\nsize = "2 GiB"\n'
        '[qos]\npriority = 4\nguaranteed = "5 Gbit/s"\n'
    )
    s = run_json("alloc", "--file", str(f), state=tmp_path / "state")
    assert s["name"] == "web" and len(s["alloc"]["ports"]) == 2


def test_refused_request_exits_1_with_the_reason(tmp_path: Path) -> None:
    st = tmp_path / "state"
    p = run("alloc", "--owner", "vm-a", "--memory", "3MiB", state=st, check=False)
    assert p.returncode == 1
    assert "memory.size" in p.stderr and "granule" in p.stderr
    p = run("alloc", "--owner", "vm-a", "--memory", "3MiB", "--json", state=st, check=False)
    assert json.loads(p.stdout)["error"]["details"]["field"] == "memory.size"
    assert run_json("slices", "list", state=st) == []


ALLOC_A = (
    "alloc", "--owner", "vm-a", "--cores", "8", "--memory", "8GiB", "--lanes", "4",
    "--endpoint", "nvme0", "--ports", "2", "--guaranteed", "20Gbit/s", "--request-id", "a-1",
)  # fmt: skip


@pytest.mark.parametrize("durability", ["power", "crash"])
def test_sigkill_after_ack_then_restart_recovers_and_reprograms(
    daemon: Daemon, durability: str
) -> None:
    """Both durability levels keep every acknowledged operation across a SIGKILL."""
    assert f"durability {durability}" in daemon.start("--durability", durability)
    st = daemon.state
    a = run_json(*ALLOC_A, state=st)
    b = run_json("alloc", "--owner", "vm-b", "--memory", "2GiB", state=st)
    fabric_before = run_json("fabric", "show", state=st)
    assert fabric_before["backend"] == "model"
    daemon.kill()  # right after the acknowledged allocations: no clean shutdown

    banner = daemon.start()
    assert "2 slices recovered" in banner
    after = {s["id"]: s for s in run_json("slices", "list", state=st)}
    assert after[a["id"]]["alloc"] == a["alloc"] and after[b["id"]]["alloc"] == b["alloc"]
    fabric_after = run_json("fabric", "show", state=st)
    # a brand-new behavioural crossbar, re-programmed from the ledger to the same image
    assert fabric_after["permission"] == fabric_before["permission"]
    assert fabric_after["weight"] == fabric_before["weight"]
    assert run_json("check", state=st) == {"violations": []}
    # the client never saw its reply and retries: no second allocation
    again = run_json(*ALLOC_A, state=st)
    assert again["id"] == a["id"]
    assert len(run_json("slices", "list", state=st)) == 2


def test_daemon_owns_the_state_dir_and_cleans_up(daemon: Daemon) -> None:
    daemon.start()
    sock = daemon.state / "admin.sock"
    assert sock.exists() and oct(sock.stat().st_mode & 0o777) == "0o600"
    second = subprocess.run(
        [*CLI, "serve", "--state-dir", str(daemon.state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1 and "in use" in second.stderr
    daemon.stop()
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert not sock.exists()


def test_daemon_answers_malformed_admin_frames(daemon: Daemon) -> None:
    """The admin socket speaks CCI: every bad frame gets an error answer with the right
    code, the daemon keeps serving, and nothing changed."""
    from abi.cci import Category, Message
    from abi.commands import BY_NAME, decode_response, encode_request
    from hostlib.socket_transport import SocketClient

    daemon.start()
    client = SocketClient(daemon.state / "admin.sock")
    try:
        status = encode_request("STATUS", {}, tag=1)
        header_only = status[:4]
        vm_only = encode_request("ALLOCATE", {
            "name": "", "cores": None, "memory": None, "lanes": None, "key": None,
            "ports": 1, "request_id": None,
            "qos": {"priority": 0, "guaranteed_mbps": 0, "maximum_mbps": 0},
        }, tag=2)  # fmt: skip
        unknown = Message(Category.REQUEST, 3, 0xC0FE, b"").encode()
        short_payload = Message(Category.REQUEST, 4, BY_NAME["GET"].opcode, b"\x01").encode()
        lying_length = bytearray(encode_request("GET", {"slice": 1}, tag=5))
        lying_length[8] = 0xFF  # payload length register says more than was sent
        for frame, code in (
            (header_only, "malformed"),
            (vm_only, "opcode_not_allowed"),
            (unknown, "unsupported"),
            (short_payload, "malformed"),
            (bytes(lying_length), "malformed"),
            (encode_request("GET", {"slice": 99}, tag=6), "not_found"),
        ):
            r = decode_response(client.request(frame, timeout=30))
            assert r.error is not None and r.error["code"] == code, (frame.hex(), r.error)
        r = decode_response(client.request(status, timeout=30))
        assert r.ok and r.payload is not None and r.payload["slices"] == 0  # still serving
    finally:
        client.close()


def test_demo_runs(tmp_path: Path) -> None:
    p = run("demo")
    out = p.stdout
    assert "refused (conflict): key" in out
    assert "refused (denied): slice 1 does not belong to vm-b" in out
    assert "identical: yes" in out and "0 violations" in out


@pytest.mark.slow
def test_bench_alloc_prints_named_figures(tmp_path: Path) -> None:
    t0 = time.monotonic()
    figures = json.loads(run("bench", "alloc", "--quick", "--json").stdout)
    for key in (
        "allocator_ops_per_s",
        "allocator_p50_us",
        "allocator_p99_us",
        "durable_ops_per_s",
        "durable_p99_us",
        "single_client_ops_per_s",
        "growth_ratio_2e20_vs_2e10",
    ):
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key
    assert figures["invariant_violations"] == 0
    assert time.monotonic() - t0 < 300


def test_in_process_commands_release_the_state_dir(tmp_path: Path) -> None:
    from firmware.cli import main

    st = str(tmp_path / "state")
    assert main(["alloc", "--owner", "vm-a", "--memory", "2MiB", "--state-dir", st]) == 0
    assert main(["slices", "list", "--state-dir", st]) == 0  # same process: lock was released


def test_bad_cli_values_are_usage_errors(tmp_path: Path) -> None:
    for args in (["--core-ids", "1,x"], ["--core-ids", ","], ["--key", "seven"]):
        p = run("alloc", "--owner", "vm-a", *args, state=tmp_path / "s", check=False)
        assert p.returncode == 2 and "usage" in p.stderr, (args, p.stderr)


def test_state_dir_too_long_for_a_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    p = run("serve", state=deep, check=False)
    assert p.returncode == 1 and "at most 107" in p.stderr


@pytest.mark.slow
def test_bench_mailbox_prints_named_figures() -> None:
    figures = json.loads(run("bench", "mailbox", "--quick", "--json").stdout)
    for key in (
        "shm_noop_rtt_p50_us",
        "socket_noop_rtt_p50_us",
        "ratio_shm_vs_socket_p50",
        "hostlib_device_noop_rtt_p50_us",
        "ratio_device_vs_shm_p50",
        "alloc_free_pairs_per_s",
        "alloc_free_pairs_per_s_durability_crash",
        "ratio_crash_vs_power",
    ):
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key


VM_SCRIPT = """
import json, sys
from hostlib import Device
cred, action = sys.argv[1], sys.argv[2]
with Device.open(cred) as dev:
    if action == "allocate":
        s = dev.allocate(cores=2, memory="1 GiB", lanes=4, endpoint="nvme0", guaranteed="5 Gbit/s")
        print(json.dumps({"id": s.id, "state": s.state, "owner": s.owner}))
    else:
        print(json.dumps([[s.id, s.state, s.owner] for s in dev.slices()]))
"""


def test_vm_process_uses_the_daemon_through_its_mailbox(daemon: Daemon, tmp_path: Path) -> None:
    """What a user does: serve, provision a VM, and the VM (a separate process with only
    hostlib and its credential) allocates through its mailbox; it survives a SIGKILL."""
    banner = daemon.start()
    assert "0 VM mailboxes" in banner
    cred = tmp_path / "vm-a.credential.toml"
    added = run_json("vm", "add", "vm-a", "--credential", str(cred), state=daemon.state)
    assert added["vm"] == "vm-a" and oct(cred.stat().st_mode & 0o777) == "0o600"
    run("vm", "add", "vm-b", "--credential", str(tmp_path / "vm-b.toml"), state=daemon.state)

    def vm(credential: Path, action: str) -> Any:
        p = subprocess.run(
            [sys.executable, "-c", VM_SCRIPT, str(credential), action],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    s = vm(cred, "allocate")
    assert s["owner"] == "vm-a" and s["state"] == "active"
    assert vm(tmp_path / "vm-b.toml", "list") == []  # vm-b does not see vm-a's slice
    daemon.kill()
    assert "2 VM mailboxes" in daemon.start()  # mailboxes served again after recovery
    assert vm(cred, "list") == [[s["id"], "active", "vm-a"]]
    assert run_json("check", state=daemon.state) == {"violations": []}
