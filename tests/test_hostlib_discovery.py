"""Discovery: which PCI devices hold this VM's mailbox, on fake devices and a fake sysfs."""

from __future__ import annotations

import mmap
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import hostlib.discovery as d
from hostlib.credentials import Credential
from hostlib.errors import DeviceNotFound, TransportError
from hostlib.mailbox import REG_VERSION, MailboxLayout, create_mailbox

KEY = bytes(32)
CAP = 4096


@dataclass
class FakeAttributes:
    values: dict[str, Any]

    def get(self, attribute: str, default: Any = None) -> Any:
        return self.values.get(attribute, default)


@dataclass
class FakeDevice:
    """Shaped like pyudev.Device: sys_path, attributes.get(), properties."""

    sys_path: str
    attributes: FakeAttributes
    properties: dict[str, str] = field(default_factory=dict)


def device(
    root: Path,
    name: str,
    vendor: Any = b"0x1af4",
    dev: Any = b"0x1110",
    *,
    bar: str = "mailbox",
    properties: dict[str, str] | None = None,
) -> FakeDevice:
    """A device directory under ``root`` whose resource2 is a mailbox, zeros, or absent."""
    path = root / name
    path.mkdir(parents=True)
    if bar == "mailbox":
        create_mailbox(path / "resource2", CAP)
    elif bar == "zeros":
        (path / "resource2").write_bytes(bytes(MailboxLayout.for_capacity(CAP).region_size))
    attrs = {k: v for k, v in (("vendor", vendor), ("device", dev)) if v is not None}
    return FakeDevice(str(path), FakeAttributes(attrs), properties or {})


def test_an_ivshmem_device_with_a_mailbox_is_a_candidate(tmp_path: Path) -> None:
    dev = device(tmp_path, "0000:00:04.0")
    found = d.scan([dev])
    size = MailboxLayout.for_capacity(CAP).region_size
    assert found.candidates == (
        d.MailboxCandidate(dev.sys_path, dev.sys_path + "/resource2", size, CAP),
    )
    assert found.rejected == ()


def test_other_devices_are_not_even_opened(tmp_path: Path) -> None:
    virtio = device(tmp_path, "virtio", dev=b"0x1041")  # same vendor, valid mailbox bytes
    intel = device(tmp_path, "intel", vendor=b"0x8086", dev=b"0x1110")
    assert d.scan([virtio, intel]) == d.Scan()


def test_ivshmem_without_the_signature_or_bar_is_rejected_with_a_reason(tmp_path: Path) -> None:
    zeros = device(tmp_path, "zeros", bar="zeros")
    missing = device(tmp_path, "missing", bar="none")
    found = d.scan([zeros, missing])
    assert found.candidates == ()
    (p1, why1), (p2, why2) = found.rejected
    assert (p1, p2) == (zeros.sys_path, missing.sys_path)
    assert "not a Slicefab mailbox" in why1 and "signature" in why1
    assert "cannot map" in why2


def test_another_major_layout_version_is_rejected(tmp_path: Path) -> None:
    dev = device(tmp_path, "v2")
    with open(Path(dev.sys_path) / "resource2", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        struct.pack_into("<H", m, REG_VERSION, 2)
    (rejected,) = d.scan([dev]).rejected
    assert "version" in rejected[1]


@pytest.mark.parametrize(
    ("vendor", "dev", "props", "ids"),
    [
        (b"0x1af4\n", b"0x1110\n", {}, (0x1AF4, 0x1110)),
        ("0x1AF4", "0x1110", {}, (0x1AF4, 0x1110)),
        (None, None, {"PCI_ID": "1AF4:1110"}, (0x1AF4, 0x1110)),
        (b"0x1af4", None, {"PCI_ID": "8086:1110"}, (0x1AF4, 0x1110)),
        (b"garbage", None, {}, (None, None)),
    ],
)
def test_pci_ids_from_attributes_or_properties(
    tmp_path: Path, vendor: Any, dev: Any, props: dict[str, str], ids: tuple[Any, Any]
) -> None:
    fake = device(tmp_path, "x", vendor, dev, properties=props)
    assert d.pci_ids(fake) == ids
    assert d.is_ivshmem(fake) == (ids == (0x1AF4, 0x1110))


def test_candidates_keep_the_enumeration_order(tmp_path: Path) -> None:
    devs = [device(tmp_path, f"0000:00:0{i}.0") for i in (5, 3)]
    assert [c.sys_path for c in d.scan(devs).candidates] == [x.sys_path for x in devs]
    cred = Credential("vm-a", KEY, "/nonexistent")
    assert d.find_mailboxes(cred, devices=devs) == [x.sys_path + "/resource2" for x in devs]
    assert d.find_mailbox(cred, devices=devs) == devs[0].sys_path + "/resource2"


def test_the_pci_device_wins_over_the_host_file(tmp_path: Path) -> None:
    host = tmp_path / "host.mbox"
    create_mailbox(host, CAP)
    dev = device(tmp_path, "0000:00:04.0")
    cred = Credential("vm-a", KEY, str(host))
    assert d.find_mailbox(cred, devices=[dev]) == dev.sys_path + "/resource2"
    assert d.find_mailbox(cred, devices=[]) == str(host)  # no PCI device: the host file


def test_nothing_found_says_why(tmp_path: Path) -> None:
    zeros = device(tmp_path, "0000:00:04.0", bar="zeros")
    cred = Credential("vm-a", KEY, str(tmp_path / "gone.mbox"))
    with pytest.raises(DeviceNotFound) as e:
        d.find_mailboxes(cred, devices=[zeros])
    assert "gone.mbox" in e.value.message and zeros.sys_path in e.value.message
    assert isinstance(e.value, TransportError)
    with pytest.raises(DeviceNotFound):
        d.find_mailbox(None, devices=[])


def test_the_sysfs_fallback_reads_a_sysfs_shaped_tree(tmp_path: Path) -> None:
    devices = tmp_path / "devices" / "pci0000:00"
    bus = tmp_path / "bus"
    bus.mkdir()
    for name, dev_id in (("0000:00:03.0", "0x1041"), ("0000:00:04.0", "0x1110")):
        path = devices / name
        path.mkdir(parents=True)
        (path / "vendor").write_text("0x1af4\n")
        (path / "device").write_text(f"{dev_id}\n")
        create_mailbox(path / "resource2", CAP)
        os.symlink(path, bus / name)  # /sys/bus/pci/devices/<bdf> -> ../../../devices/...
    found = d.scan(d.sysfs_pci_devices(bus))
    assert [c.sys_path for c in found.candidates] == [str(devices / "0000:00:04.0")]
    assert d.sysfs_pci_devices(tmp_path / "absent") == []


def test_pci_devices_falls_back_to_sysfs_without_pyudev(monkeypatch: pytest.MonkeyPatch) -> None:
    marker: list[Any] = [object()]
    monkeypatch.setitem(sys.modules, "pyudev", None)  # import pyudev -> ImportError
    monkeypatch.setattr(d, "sysfs_pci_devices", lambda: marker)
    assert d.pci_devices() is marker


def test_pci_devices_enumerates_with_pyudev_here() -> None:
    pytest.importorskip("pyudev")
    devices = d.pci_devices()
    assert all(isinstance(x.sys_path, str) for x in devices)
    assert {os.path.basename(x.sys_path) for x in devices} == set(
        os.listdir(d.SYSFS_PCI) if d.SYSFS_PCI.exists() else []
    )
