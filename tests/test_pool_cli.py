"""``slicefab pool``: up / status / compose / list / show / release / down on loopback, and the
refusals that need no etcd."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from firmware.cli import main
from firmware.errors import SlicefabError
from firmware.pool.cluster import etcd_binary


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pool_commands_need_a_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLICEFAB_POOL", raising=False)
    code, _, err = run(capsys, "pool", "status", "--dir", str(tmp_path))
    assert code == 1 and "no pool given" in err
    code, _, err = run(capsys, "pool", "status", "--pool", "localhost:2379")
    assert code == 1 and "not an etcd client URL" in err


def test_serve_with_pool_needs_a_device_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "serve", "--state-dir", str(tmp_path / "s"), "--pool", "http://127.0.0.1:9"
    )
    assert code == 1 and "--device-id" in err


@pytest.mark.etcd
def test_pool_up_compose_release_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        etcd_binary()
    except SlicefabError:  # pragma: no cover
        pytest.skip("etcd-server is not installed")
    d = str(tmp_path / "pool")
    code, out, err = run(capsys, "pool", "up", "--dir", d, "--devices", "2", "--json")
    try:
        assert code == 0, err
        record = json.loads(out)
        pids = [p["pid"] for p in record["devices"] + record["etcd"]]
        code, out, _ = run(capsys, "pool", "status", "--dir", d, "--json")
        assert [x["device"] for x in json.loads(out)["devices"]] == ["dev0", "dev1"]
        code, out, err = run(
            capsys, "pool", "compose", "--dir", d, "--owner", "vm-a", "--cores", "80",
            "--memory", "8GiB", "--nvme", "1", "--id", "c1", "--json",
        )  # fmt: skip
        assert code == 0, err
        c = json.loads(out)
        assert c["state"] == "active" and len(c["parts"]) == 2
        code, out, _ = run(capsys, "pool", "list", "--dir", d, "--owner", "vm-a", "--json")
        assert [x["id"] for x in json.loads(out)] == ["c1"]
        code, _, err = run(capsys, "pool", "release", "c1", "--dir", d, "--owner", "vm-b")
        assert code == 1 and "does not belong to vm-b" in err
        code, out, err = run(
            capsys, "pool", "compose", "--dir", d, "--owner", "vm-b", "--cores", "100"
        )
        assert code == 1 and "cores: requested 100" in err
        code, _, _ = run(capsys, "pool", "release", "c1", "--dir", d)
        assert code == 0
        code, out, _ = run(capsys, "pool", "show", "c1", "--dir", d)
        assert code == 1
    finally:
        code, out, _ = run(capsys, "pool", "down", "--dir", d, "--json")
    assert code == 0
    assert sorted(json.loads(out)["stopped"]) == sorted(pids)
    for pid in pids:
        assert (
            not os.path.exists(f"/proc/{pid}")
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
