"""Finding this VM's mailbox: the ivshmem PCI device in a guest, the host file otherwise.

In a QEMU guest the mailbox is BAR2 of an ``ivshmem-plain`` PCI device (vendor 1af4h,
device 1110h; DESIGN.md "QEMU") whose memory backend is the firmware's mailbox file, so
``/sys/bus/pci/devices/<bdf>/resource2`` starts with the mailbox header (signature
``SFMB``, docs/mailbox.md). Other ivshmem devices may exist (any shared memory a guest is
given), so the signature and layout decide, not the ids alone.

Enumeration uses pyudev (subsystem ``pci``). Where pyudev or libudev is missing (a minimal
guest) the same filter runs over ``/sys/bus/pci/devices`` read directly. The filter
(:func:`scan`) is a pure function of device-like objects: anything with ``sys_path`` and
``attributes.get(name)`` (pyudev's :class:`pyudev.Device` is one), and optionally
``properties`` (for ``PCI_ID``), so tests run it on fakes.

When no PCI device carries a mailbox (a VM process on the host, the usual case in tests)
the mailbox is the host file the credential names.

A guest's sysfs resource files are mode 0600: opening the mailbox there needs root.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hostlib.credentials import Credential
from hostlib.errors import DeviceNotFound
from hostlib.mailbox import HEADER_SIZE, MailboxLayout
from hostlib.transport import MailboxLayoutError

IVSHMEM_VENDOR = 0x1AF4  # Red Hat, Inc. (virtio and QEMU's ivshmem)
IVSHMEM_DEVICE = 0x1110  # Inter-VM shared memory (ivshmem-plain and -doorbell)
MAILBOX_BAR = 2  # ivshmem: BAR0 registers, BAR1 MSI-X, BAR2 the shared memory
SYSFS_PCI = Path("/sys/bus/pci/devices")


class AttributeSource(Protocol):
    """What discovery reads of a device's sysfs attributes (pyudev's ``Attributes``)."""

    def get(self, attribute: str, default: Any = None) -> Any: ...


class PciDeviceLike(Protocol):
    """A PCI device as discovery sees it: pyudev's ``Device``, the sysfs fallback, or a
    test's fake. ``properties`` (a mapping with ``PCI_ID``) is read if present."""

    @property
    def sys_path(self) -> str: ...

    @property
    def attributes(self) -> AttributeSource: ...


@dataclass(frozen=True)
class MailboxCandidate:
    """A PCI device whose BAR2 holds a valid mailbox header."""

    sys_path: str  # /sys/devices/pci0000:00/0000:00:04.0
    resource2: str  # what MailboxClient maps
    size: int  # bytes of the BAR (= the mailbox region)
    capacity: int  # bytes of each of the mailbox's request/response buffers


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` found: the usable mailboxes, and why each other ivshmem device
    was passed over (``(sys_path, reason)``, for the error a user sees)."""

    candidates: tuple[MailboxCandidate, ...] = ()
    rejected: tuple[tuple[str, str], ...] = field(default=())


def _hex_value(raw: Any) -> int | None:
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes | bytearray) else str(raw)
    try:
        return int(text.strip(), 16)
    except ValueError:
        return None


def pci_ids(device: PciDeviceLike) -> tuple[int | None, int | None]:
    """``(vendor, device)`` from the ``vendor``/``device`` attributes (``0x1af4``), else
    from the ``PCI_ID`` property (``1AF4:1110``); None where neither says."""
    vendor = _hex_value(device.attributes.get("vendor"))
    dev = _hex_value(device.attributes.get("device"))
    if vendor is None or dev is None:
        props = getattr(device, "properties", None)
        pci_id = props.get("PCI_ID") if isinstance(props, Mapping) else None
        if isinstance(pci_id, str) and ":" in pci_id:
            v, d = pci_id.split(":", 1)
            vendor = _hex_value(v) if vendor is None else vendor
            dev = _hex_value(d) if dev is None else dev
    return vendor, dev


def is_ivshmem(device: PciDeviceLike) -> bool:
    """Whether the device is QEMU's ivshmem (1af4:1110)."""
    return pci_ids(device) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE)


def probe_mailbox(path: str | os.PathLike[str]) -> MailboxLayout:
    """The mailbox layout at the start of ``path`` (a BAR's resource file, or a host file),
    read through a read-only mapping of its header page: sysfs resource files of memory
    BARs cannot be ``read()``, only mapped.

    Raises:
        MailboxLayoutError: (the transport's) no signature, another major version, a size
            that disagrees with the region, or a region smaller than a header.
        OSError: the file cannot be opened or mapped (a guest's resource2 needs root).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise MailboxLayoutError(f"{os.fspath(path)}: {size} bytes is smaller than a header")
        with mmap.mmap(fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            return MailboxLayout.parse(mm[:HEADER_SIZE], size)
    finally:
        os.close(fd)


def scan(devices: Iterable[PciDeviceLike]) -> Scan:
    """The ivshmem devices among ``devices`` whose BAR2 holds a mailbox, in the order
    given. Reads only the header page of each ivshmem device's ``resource2``; other devices
    are not touched. Never raises for a device it cannot use: it records why in
    :attr:`Scan.rejected`."""
    found: list[MailboxCandidate] = []
    rejected: list[tuple[str, str]] = []
    for dev in devices:
        if not is_ivshmem(dev):
            continue
        resource = os.path.join(dev.sys_path, f"resource{MAILBOX_BAR}")
        try:
            layout = probe_mailbox(resource)
        except MailboxLayoutError as e:
            rejected.append((dev.sys_path, f"not a Slicefab mailbox: {e}"))
            continue
        except OSError as e:
            rejected.append((dev.sys_path, f"cannot map {resource}: {e.strerror or e}"))
            continue
        found.append(MailboxCandidate(dev.sys_path, resource, layout.region_size, layout.capacity))
    return Scan(tuple(found), tuple(rejected))


class _SysfsAttributes:
    def __init__(self, sys_path: str) -> None:
        self._sys_path = sys_path

    def get(self, attribute: str, default: Any = None) -> Any:
        try:
            with open(os.path.join(self._sys_path, attribute), "rb") as f:
                return f.read().strip()
        except OSError:
            return default


class SysfsPciDevice:
    """A PCI device read straight from sysfs: discovery's fallback when pyudev or
    libudev is not installed."""

    def __init__(self, sys_path: str) -> None:
        self._sys_path = sys_path
        self._attributes = _SysfsAttributes(sys_path)

    @property
    def sys_path(self) -> str:
        return self._sys_path

    @property
    def attributes(self) -> _SysfsAttributes:
        return self._attributes

    def __repr__(self) -> str:
        return f"SysfsPciDevice({self._sys_path!r})"


def sysfs_pci_devices(root: str | os.PathLike[str] = SYSFS_PCI) -> list[PciDeviceLike]:
    """Every PCI device under ``root`` (``/sys/bus/pci/devices``); none if it is absent."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [SysfsPciDevice(os.path.realpath(os.path.join(root, n))) for n in names]


def pci_devices() -> list[PciDeviceLike]:
    """Every PCI device, enumerated with pyudev (subsystem ``pci``); read from sysfs when
    pyudev or libudev cannot be loaded. Never raises for a missing udev."""
    try:
        import pyudev  # type: ignore[import-untyped]

        return list(pyudev.Context().list_devices(subsystem="pci"))
    except (ImportError, OSError):
        return sysfs_pci_devices()


def find_mailboxes(
    credential: Credential | None = None, *, devices: Iterable[PciDeviceLike] | None = None
) -> list[str]:
    """Paths of the mailboxes this VM may use, best first: the ``resource2`` of every
    ivshmem device holding a mailbox (``devices``: default :func:`pci_devices`), else the
    credential's host file.

    Raises:
        DeviceNotFound: no ivshmem device holds a mailbox and the credential's host file
            does not exist; the message says why each ivshmem device was passed over.
    """
    found = scan(pci_devices() if devices is None else devices)
    if found.candidates:
        return [c.resource2 for c in found.candidates]
    if credential is not None and os.path.exists(credential.mailbox):
        return [credential.mailbox]
    why = "; ".join(f"{path}: {reason}" for path, reason in found.rejected)
    host = f", and no host file {credential.mailbox}" if credential is not None else ""
    raise DeviceNotFound(
        f"no Slicefab mailbox: no ivshmem PCI device ({IVSHMEM_VENDOR:04x}:{IVSHMEM_DEVICE:04x})"
        f" with the mailbox signature{host}" + (f" ({why})" if why else ""),
        details={"rejected": [list(r) for r in found.rejected]},
    )


def find_mailbox(
    credential: Credential | None = None, *, devices: Iterable[PciDeviceLike] | None = None
) -> str:
    """The path to open with ``MailboxClient``: the first of :func:`find_mailboxes`.

    Raises:
        DeviceNotFound: as :func:`find_mailboxes`.
    """
    return find_mailboxes(credential, devices=devices)[0]


__all__ = [
    "IVSHMEM_DEVICE",
    "IVSHMEM_VENDOR",
    "MailboxCandidate",
    "PciDeviceLike",
    "Scan",
    "SysfsPciDevice",
    "find_mailbox",
    "find_mailboxes",
    "is_ivshmem",
    "pci_devices",
    "pci_ids",
    "probe_mailbox",
    "scan",
    "sysfs_pci_devices",
]
