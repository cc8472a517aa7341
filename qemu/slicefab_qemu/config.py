"""What one VM is made of, and the QEMU and virtme-ng command lines that build it.

Pure functions of a :class:`VmConfig` and the VM's run directory: no process is started
here, so the composition is unit-tested without QEMU. The devices (docs/qemu.md):

==========================  =============================================================
``ivshmem-plain`` sf-mbox   the offload device's PCIe function: BAR2 is the VM's mailbox
                            file (``memory-backend-file,share=on``), which the firmware
                            serves (docs/mailbox.md)
``pxb-cxl`` + ``cxl-rp`` +  the device's memory as the guest kernel sees CXL memory: a CXL
``cxl-type3`` sf-cxl-mem    host bridge, a root port and a type-3 memory device, with a
                            fixed memory window (``cxl-fmw``) routed to the host bridge
``virtio-mem-pci`` sf-vmem  where memory slices appear: the firmware sets its
                            ``requested-size`` to the sum of the VM's memory slices
                            (QEMU 7.2 has no CXL Dynamic Capacity, see docs/qemu.md)
``pcie-root-port`` sf-rpN   empty hot-plug slots: an NVMe-pinned lane slice becomes an
                            NVMe controller plugged into one of them
``virtio-balloon-pci``      never inflated: it is there for its guest statistics
sf-balloon                  (``guest-stats``, polled every :data:`BALLOON_POLL_S`), the
                            firmware's own measure of the guest's memory use
                            (slicefab_qemu.usage, docs/adaptive.md)
spare vCPU slots            ``-smp N,maxcpus=M``: slots for vCPU hot-plug by hand (QMP);
                            core slices do not use them (docs/qemu.md says why)
QMP, guest agent, runner    Unix sockets in the run directory: QEMU's monitors (one for
                            the launcher, one for the firmware), the QEMU
                            guest agent and the Slicefab guest runner (virtio-serial)
==========================  =============================================================

Identifiers the firmware's QMP backend relies on are the module constants below; they are
also written to the run directory's ``vm.json`` so that the backend never guesses.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from firmware.errors import RequestError
from firmware.units import GiB, KiB, MiB

#: device and object ids (QOM paths are /machine/peripheral/<id>)
MAILBOX_MEM = "sf-mbox-mem"
MAILBOX_DEV = "sf-mbox"
VMEM_MEM = "sf-vmem-mem"
VMEM_DEV = "sf-vmem"
CXL_MEM = "sf-cxl-mem"
CXL_LSA = "sf-cxl-lsa"
CXL_HOST_BRIDGE = "sf-cxl-hb"
CXL_ROOT_PORT = "sf-cxl-rp"
CXL_DEV = "sf-cxl-type3"
BALLOON_DEV = "sf-balloon"
ROOT_PORT_PREFIX = "sf-rp"
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"


def peripheral_path(dev_id: str) -> str:
    """The QOM path of a device the command line gave ``id=dev_id`` (for qom-get)."""
    return f"/machine/peripheral/{dev_id}"
RUNNER_PORT = "org.slicefab.runner.0"

#: ids of devices the backend hot-plugs: ``sf-nvme-<slice>``
NVME_PREFIX = "sf-nvme-"
#: the NVMe serial number of a slice's controller (≤ 20 characters, NVMe spec 1.4 §5.15.2)
NVME_SERIAL_PREFIX = "slicefab-"

#: how often the guest's balloon driver refreshes its statistics (seconds)
BALLOON_POLL_S = 2
#: how long a TCG boot may take before ``up`` gives up (20-40 s on the 2-core machine)
BOOT_TIMEOUT_S = 240.0
#: Linux limits a Unix socket path to 107 bytes (sun_path with its NUL)
MAX_SOCKET_PATH = 107
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@:=-]+")  # vng passes options through a shell


def nvme_serial(slice_id: int) -> str:
    return f"{NVME_SERIAL_PREFIX}{slice_id}"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_kernel() -> Path:
    """The newest Debian kernel in /boot (``linux-image-amd64``).

    Raises RequestError naming ``kernel`` if there is none."""
    found = sorted(glob.glob("/boot/vmlinuz-*"), key=_kernel_version)
    if not found:
        raise RequestError(
            "kernel",
            "no /boot/vmlinuz-* found; install the Debian kernel (apt-get install "
            "linux-image-amd64) or pass a kernel image",
        )
    return Path(found[-1])


def _kernel_version(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


@dataclass(frozen=True)
class VmConfig:
    """The hardware of one VM. Sizes in bytes.

    ``boot_cpus`` vCPUs run from boot; ``max_cpus - boot_cpus`` slots are spare for core
    slices. ``hotplug_memory`` is the virtio-mem region: the most slice memory the VM can
    take. ``root_ports``: hot-plug slots for NVMe endpoints. ``accel``: ``tcg`` (the
    default: DESIGN.md assumes no KVM) or ``kvm``."""

    name: str
    boot_cpus: int = 1
    max_cpus: int = 4
    memory: int = 1 * GiB
    hotplug_memory: int = 1 * GiB
    block_size: int = 2 * MiB
    root_ports: int = 2
    cxl_memory: int = 256 * MiB
    kernel: str = ""  # empty: default_kernel()
    accel: str = "tcg"
    extra_append: tuple[str, ...] = field(default=())

    def validate(self) -> None:
        """Raises RequestError naming the field, the limit and what was expected."""
        if not isinstance(self.name, str) or not _VM_NAME.fullmatch(self.name):
            raise RequestError(
                "name", f"{self.name!r} is not a VM id (1-64 of A-Z a-z 0-9 _ . -)"
            )
        if not 1 <= self.boot_cpus <= 8:
            raise RequestError("boot_cpus", f"expected 1..8 vCPUs at boot, got {self.boot_cpus}")
        if not self.boot_cpus <= self.max_cpus <= 16:
            raise RequestError(
                "max_cpus",
                f"expected boot_cpus ({self.boot_cpus}) .. 16 vCPU slots, got {self.max_cpus}",
            )
        if self.memory < 256 * MiB or self.memory % MiB:
            raise RequestError(
                "memory", f"expected at least 256 MiB in whole MiB, got {self.memory} bytes"
            )
        if not _is_pow2(self.block_size) or self.block_size < 2 * MiB:
            raise RequestError(
                "block_size",
                f"virtio-mem needs a power of two ≥ 2 MiB, got {self.block_size} bytes",
            )
        if self.hotplug_memory <= 0 or self.hotplug_memory % self.block_size:
            raise RequestError(
                "hotplug_memory",
                f"expected a positive multiple of the block size ({self.block_size} bytes), "
                f"got {self.hotplug_memory}",
            )
        if not 0 <= self.root_ports <= 16:
            raise RequestError("root_ports", f"expected 0..16, got {self.root_ports}")
        if not _is_pow2(self.cxl_memory) or self.cxl_memory < 256 * MiB:
            raise RequestError(
                "cxl_memory",
                f"a CXL type-3 device needs a power of two ≥ 256 MiB, got {self.cxl_memory}",
            )
        if self.accel not in ("tcg", "kvm"):
            raise RequestError("accel", f"expected 'tcg' or 'kvm', got {self.accel!r}")
        for arg in self.extra_append:
            if not _SAFE_PATH.fullmatch(arg):
                raise RequestError("extra_append", f"kernel argument {arg!r} has unsafe characters")

    @property
    def maxmem(self) -> int:
        """``-m maxmem``: boot RAM + the virtio-mem region, rounded up to 1 GiB."""
        total = self.memory + self.hotplug_memory
        return -(-total // GiB) * GiB

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_append"] = list(self.extra_append)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VmConfig:
        d = dict(d)
        d["extra_append"] = tuple(d.get("extra_append", ()))
        return cls(**d)


@dataclass(frozen=True)
class RunPaths:
    """A VM's run directory, ``<state>/run/<vm>/``: everything that exists only while it
    runs (removed by ``down``)."""

    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def firmware_qmp(self) -> Path:
        """A second monitor, the firmware's own: QEMU serves one client per monitor."""
        return self.root / "fw-qmp.sock"

    @property
    def agent(self) -> Path:
        return self.root / "qga.sock"

    @property
    def runner(self) -> Path:
        return self.root / "runner.sock"

    @property
    def record(self) -> Path:
        return self.root / "vm.json"

    @property
    def log(self) -> Path:
        return self.root / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def guest(self) -> Path:
        """Handed to the guest: the credential (0600), read by the guest's init."""
        return self.root / "guest"

    @property
    def credential(self) -> Path:
        """The VM's credential in :attr:`guest` (guest/init.sh installs it)."""
        return self.guest / "credential.toml"

    @property
    def tmp(self) -> Path:
        """TMPDIR of virtme-ng (its initramfs and return-code files)."""
        return self.root / "tmp"

    def check(self) -> None:
        """Raises RequestError if a socket path is too long or a path has characters the
        virtme-ng shell layer would mangle."""
        for sock in (self.qmp, self.firmware_qmp, self.agent, self.runner):
            n = len(os.fsencode(sock))
            if n > MAX_SOCKET_PATH:
                raise RequestError(
                    "state_dir",
                    f"socket path {sock} is {n} bytes, Unix sockets allow {MAX_SOCKET_PATH}; "
                    "use a shorter state directory",
                )
        if not _SAFE_PATH.fullmatch(str(self.root)):
            raise RequestError(
                "state_dir",
                f"{self.root} has characters other than A-Z a-z 0-9 _ . / + @ : = -, "
                "which virtme-ng's shell layer would mangle",
            )


def run_paths(state_dir: Path, vm: str) -> RunPaths:
    return RunPaths(Path(state_dir).absolute() / "run" / vm)


def _size(n: int) -> str:
    for unit, mult in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def qemu_args(config: VmConfig, run: RunPaths, mailbox: Path, mailbox_size: int) -> list[str]:
    """The QEMU arguments vng adds to its own (its ``-machine q35``, ``-m`` and ``-smp``
    are merged with ours: QEMU merges repeated ``-machine``/``-m``/``-smp`` options).

    Raises RequestError if the mailbox size is not a power of two (a PCI BAR must be one).
    """
    if not _is_pow2(mailbox_size):
        raise RequestError(
            "mailbox", f"ivshmem needs a power-of-two BAR, the mailbox is {mailbox_size} bytes"
        )
    c = config
    a: list[str] = [
        "-machine", f"q35,cxl=on,accel={c.accel}",
        "-M", f"cxl-fmw.0.targets.0={CXL_HOST_BRIDGE},cxl-fmw.0.size=4G",
        "-m", f"{_size(c.memory)},slots=4,maxmem={_size(c.maxmem)}",
        "-smp", f"{c.boot_cpus},maxcpus={c.max_cpus}",
        "-pidfile", str(run.pidfile),
        # the offload device's PCIe function: BAR2 is the VM's mailbox file
        "-object",
        f"memory-backend-file,id={MAILBOX_MEM},mem-path={mailbox},"
        f"size={mailbox_size},share=on",
        "-device", f"ivshmem-plain,bus=pcie.0,id={MAILBOX_DEV},memdev={MAILBOX_MEM}",
        # CXL: host bridge, root port, type-3 memory device with its label storage area
        "-object", f"memory-backend-ram,id={CXL_MEM},size={_size(c.cxl_memory)}",
        "-object", f"memory-backend-ram,id={CXL_LSA},size=1M",
        "-device", f"pxb-cxl,bus_nr=12,bus=pcie.0,id={CXL_HOST_BRIDGE}",
        "-device",
        f"cxl-rp,port=0,bus={CXL_HOST_BRIDGE},id={CXL_ROOT_PORT},chassis=0,slot=2",
        "-device",
        f"cxl-type3,bus={CXL_ROOT_PORT},memdev={CXL_MEM},lsa={CXL_LSA},id={CXL_DEV}",
        # memory slices: virtio-mem, unplugged at boot
        "-object", f"memory-backend-ram,id={VMEM_MEM},size={_size(c.hotplug_memory)}",
        "-device",
        f"virtio-mem-pci,bus=pcie.0,id={VMEM_DEV},memdev={VMEM_MEM},"
        f"block-size={_size(c.block_size)},requested-size=0",
        # guest memory statistics for the usage model (a balloon never inflated)
        "-device",
        f"virtio-balloon-pci,bus=pcie.0,id={BALLOON_DEV},"
        f"guest-stats-polling-interval={BALLOON_POLL_S}",
    ]  # fmt: skip
    for i in range(c.root_ports):
        a += [
            "-device",
            f"pcie-root-port,bus=pcie.0,id={ROOT_PORT_PREFIX}{i},chassis={16 + i},slot={16 + i}",
        ]
    a += [
        # monitor, guest agent, runner
        "-chardev", f"socket,id=sf-qmp,path={run.qmp},server=on,wait=off",
        "-mon", "chardev=sf-qmp,mode=control",
        "-chardev", f"socket,id=sf-fw-qmp,path={run.firmware_qmp},server=on,wait=off",
        "-mon", "chardev=sf-fw-qmp,mode=control",
        "-device", "virtio-serial-pci,bus=pcie.0,id=sf-serial",
        "-chardev", f"socket,id=sf-qga,path={run.agent},server=on,wait=off",
        "-device", f"virtserialport,bus=sf-serial.0,chardev=sf-qga,name={GUEST_AGENT_PORT}",
        "-chardev", f"socket,id=sf-runner,path={run.runner},server=on,wait=off",
        "-device", f"virtserialport,bus=sf-serial.0,chardev=sf-runner,name={RUNNER_PORT}",
    ]  # fmt: skip
    return a


GUEST_INIT = Path(__file__).parent / "guest" / "init.sh"


def guest_command(run: RunPaths, mask: Path, python: str) -> str:
    """What virtme-ng runs as the guest's main program (``vng --exec``)."""
    return shlex.join(["/bin/sh", str(GUEST_INIT), str(run.guest), str(mask), python])


def vng_argv(
    vng: str, config: VmConfig, kernel: Path, qemu: list[str], command: str
) -> list[str]:
    """The virtme-ng command line: the Debian kernel over the host's root file system
    (9p: this QEMU has no virtiofsd), q35 rather than microvm (CXL and PCIe hot-plug need
    it), hot-plugged memory onlined movable (so that it can be unplugged again), and a
    fully preemptible guest kernel: with Debian's default voluntary preemption, the
    kworker that offlines unplugged virtio-mem blocks held the guest's one vCPU for
    1.7 s at a time (docs/qemu.md, "No interruption")."""
    argv = [
        vng,
        "--run", str(kernel),
        "--name", config.name,
        "--cpus", str(config.boot_cpus),
        "--memory", _size(config.memory),
        "--disable-microvm",
        "--force-9p",
        "--verbose",  # the guest console goes to the log file
        "--cwd", "/",
        "--append", "memhp_default_state=online_movable",
        "--append", "preempt=full",
    ]  # fmt: skip
    if config.accel == "tcg":
        argv.append("--disable-kvm")
    for extra in config.extra_append:
        argv += ["--append", extra]
    argv += ["--exec", command, f"--qemu-opts={shlex.join(qemu)}"]
    return argv
