"""Coverage-guided fuzzing of the secure allocation API with atheris (libFuzzer).

The hypothesis harnesses in tests/test_api_fuzz.py run in CI; this one runs for as long
as you let it and keeps a corpus. Every input is a frame on vm-a's channel: the first byte
picks how it is built (raw, or a validly sealed request with a fresh sequence number so the
fuzzer reaches the parsers and handlers), the rest is the frame or the message. A crash,
an exception out of the pipeline, an undecodable answer or a broken invariant is a finding.

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_api.py -max_total_time=600 tests/fuzz/corpus
"""

from __future__ import annotations

import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from abi.commands import COMMANDS, Role, decode_response
    from abi.envelope import REQUEST_DOMAIN, RESPONSE_DOMAIN, open_sealed, seal
    from firmware.api import Api, Channel
    from firmware.manager import StateDir, open_manager
    from firmware.slices import SliceSpec

state = StateDir(tempfile.mkdtemp(prefix="slicefab-atheris-"))
manager = open_manager(state)
api = Api(manager, manager.vms)
KEY = manager.vms.add("vm-a", "/nonexistent/vm-a.mbox").key
manager.vms.add("vm-b", "/nonexistent/vm-b.mbox")
manager.allocate(SliceSpec.from_dict({"owner": "vm-b", "memory": {"size": "1 GiB"}}))
channel = Channel(Role.VM, "vm-a")
channel.limiter.burst = 10**9
channel.limiter._tokens = 10**9
OPCODES = sorted(COMMANDS)
seq = 0
runs = 0


def one_input(data: bytes) -> None:
    global seq, runs
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        seq += 1
        frame = seal(KEY, REQUEST_DOMAIN, "vm-a", seq, body)
    else:
        frame = body
    answer = api.handle_vm_frame(channel, frame)  # must never raise
    message, _ = open_sealed(KEY, RESPONSE_DOMAIN, "vm-a", answer)
    decode_response(message)  # every answer decodes
    runs += 1
    if runs % 200 == 0:
        violations = manager.check_invariants()
        if violations:
            raise AssertionError(violations)
        if any(s["owner"] != "vm-b" for s in manager.list_slices(owner="vm-b")):
            raise AssertionError("vm-a reached vm-b's slices")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
