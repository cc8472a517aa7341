"""The C fast path (``cffi_ext._slicefab``) and the switch between it and the Python reference.

The firmware uses the C fast path by default for the two places where it pays
(``docs/fastpath.md``):

* **fabric reconfiguration** — per-port demand → the crossbar's full register image →
  the minimal ordered write list (:class:`CImagePlanner`, the C twin of
  :class:`firmware.fabric.image.ImagePlanner`);
* **allocator unit searches** — free-core bitmaps, aligned lane-group search, free-extent
  indexes (:mod:`firmware.resources.fast`, C twins of :mod:`firmware.resources`).

``SLICEFAB_FASTPATH=0`` selects the pure-Python reference everywhere; it stays the
specification the C code is tested against (``tests/test_fastpath*.py``). With the fast path
selected and the extension not built, importing this module fails with an ImportError that
says how to build it: the firmware never falls back silently to the slow path.

The switch is read when a component is built (an :class:`~firmware.allocator.Allocator`, a
:class:`~firmware.fabric.driver.FabricDriver`), so a process may build both kinds side by
side, which is what the differential tests and ``slicefab bench fastpath`` do.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from firmware.errors import ConfigError, FabricError
from firmware.fabric.image import ImagePlanner, PortDemand, check_demand

if TYPE_CHECKING:
    from firmware.inventory import Device

ENV: Final = "SLICEFAB_FASTPATH"

BUILD_HINT: Final = (
    "the C fast path (module cffi_ext._slicefab) is not built. Build it with `make setup` "
    "(pip install -e '.[dev]' compiles it), or after a C edit with `make fastpath`; "
    f"{ENV}=0 selects the pure-Python reference instead"
)


class FastPathUnavailable(ImportError):
    """The fast path is selected but ``cffi_ext._slicefab`` cannot be imported."""


def enabled() -> bool:
    """True unless ``SLICEFAB_FASTPATH=0``.

    Raises:
        ConfigError: the variable holds anything but ``0`` or ``1`` (or is empty).
    """
    value = os.environ.get(ENV, "").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ConfigError(
        f"{ENV}={value!r}: expected 0 (pure-Python reference) or 1 (C fast path, the default)",
        field=ENV,
        value=value,
        expected=["0", "1"],
    )


#: ``make sanitize`` points this at the ASan+UBSan build of the same sources
MODULE_ENV: Final = "SLICEFAB_FASTPATH_MODULE"
MODULES: Final = ("cffi_ext._slicefab", "cffi_ext._slicefab_asan")

_module: ModuleType | None = None


def extension() -> ModuleType:
    """The compiled module (``ffi``, ``lib``). Raises :class:`FastPathUnavailable`."""
    global _module
    if _module is None:
        name = os.environ.get(MODULE_ENV) or MODULES[0]
        if name not in MODULES:
            raise FastPathUnavailable(f"{MODULE_ENV}={name!r}: expected one of {MODULES}")
        try:
            _module = importlib.import_module(name)
        except ImportError as e:
            raise FastPathUnavailable(f"{BUILD_HINT} ({e})") from e
    return _module


if enabled():  # selected: a missing extension is an import error, never a silent fallback
    extension()


@contextlib.contextmanager
def selected(fast: bool) -> Iterator[None]:
    """Build components on the C path (``fast``) or the Python reference inside the block
    (sets ``SLICEFAB_FASTPATH``; for benchmarks and tests that run both side by side)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "1" if fast else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = before


# --------------------------------------------------------------------------- errors

#: the name an error message uses for each SF_F_* field of slicefab_fast.h
FIELD_LABELS: Final[Mapping[str, str]] = {
    "NONE": "input",
    "N_PORTS": "crossbar.ports",
    "N_KEYS": "keys",
    "PORT_MBPS": "crossbar.port_mbps",
    "CLOCK_MHZ": "crossbar.clock_mhz",
    "DATA_BYTES": "crossbar.data_bytes",
    "OWNER": "owner",
    "PRIORITY": "priority",
    "GUARANTEED": "guaranteed_mbps",
    "LIMIT": "limit_mbps",
    "KEYS": "keys",
    "PORTS": "ports",
    "KEY": "key",
    "IMAGE_LEN": "image length",
    "OUT_CAP": "output capacity",
    "COUNT": "count",
    "CLUSTER": "cluster",
    "CORE": "core",
    "WIDTH": "width",
    "LANE": "lane",
    "GROUP": "group",
    "START": "start",
    "LENGTH": "length",
    "MAX_EXTENTS": "max_extents",
    "N_SLICES": "slices",
    "MAX_BW": "max_mbps",
    "MEMORY": "memory",
    "SLICE": "slice record",
}

#: what each negative SF_E* status of slicefab_fast.h means
STATUS_LABELS: Final[Mapping[str, str]] = {
    "EINVAL": "invalid argument",
    "ERANGE": "out of range",
    "ENOSPC": "insufficient",
    "ECONFLICT": "conflict",
    "ENOMEM": "out of memory",
    "EFRAG": "fragmented",
    "ENOTHELD": "not held",
}

_labels: tuple[dict[int, str], dict[int, str]] | None = None


def describe_error(err: Any) -> tuple[str, dict[str, Any]]:
    """(message, details) of a filled ``sf_error``: the field, the value, the limit. The
    numbers of fields and statuses come from the header, through the module."""
    global _labels
    if _labels is None:
        lib = extension().lib
        _labels = (
            {getattr(lib, f"SF_F_{k}"): v for k, v in FIELD_LABELS.items()},
            {getattr(lib, f"SF_{k}"): v for k, v in STATUS_LABELS.items()},
        )
    fields, statuses = _labels
    field = fields.get(int(err.field), f"field {int(err.field)}")
    status = statuses.get(int(err.code), f"status {int(err.code)}")
    where = f" (element {int(err.index)})" if err.index >= 0 else ""
    message = f"{field}{where}: {status}: value {int(err.value)}, limit {int(err.limit)}"
    details = {
        "field": field,
        "status": int(err.code),
        "index": int(err.index),
        "value": int(err.value),
        "limit": int(err.limit),
    }
    return message, details


def fabric_error(err: Any, what: str) -> FabricError:
    message, details = describe_error(err)
    return FabricError(f"{what}: {message}", **details)


# --------------------------------------------------------------------------- fabric image


class CImagePlanner:
    """The C twin of :class:`firmware.fabric.image.ImagePlanner`: same interface, same write
    lists, the image and the per-port demand held in C arrays.

    :meth:`plan` copies into C only the ports whose :class:`PortDemand` object changed since
    the last plan (the allocator hands out the same object while a port's totals do not
    change), then one C call computes every port's registers and the minimal write list.
    Not thread-safe: the driver calls it under its fabric lock.
    """

    def __init__(self, device: Device) -> None:
        mod = extension()
        self._ffi, self._lib = mod.ffi, mod.lib
        ffi = self._ffi
        xb = device.crossbar
        self.n_ports = xb.ports
        self._regs = xb.ports * self._lib.SF_SHADOW_REGS
        self._params = ffi.new("sf_xbar_params *")
        self._params.n_ports = xb.ports
        self._params.n_keys = device.keys
        self._params.port_mbps = xb.port_mbps
        self._params.clock_mhz = xb.clock_mhz
        self._params.data_bytes = xb.data_bytes
        self._demand = ffi.new("sf_port_demand[]", xb.ports)
        self._current = ffi.new("uint32_t[]", self._regs)
        self._known = ffi.new("uint8_t[]", self._regs)
        self._target = ffi.new("uint32_t[]", self._regs)
        self._writes = ffi.new("sf_reg_write[]", self._regs)
        self._n_writes = ffi.new("uint32_t *")
        self._err = ffi.new("sf_error *")
        self._all_known = False
        self._addr = [
            self._lib.sf_xbar_shadow_addr(p, r)
            for p in range(xb.ports)
            for r in range(self._lib.SF_SHADOW_REGS)
        ]
        self._owners: dict[str, int] = {}
        self._last: list[PortDemand | None] = [None] * xb.ports
        for p in range(xb.ports):
            self._demand[p].owner = -1

    def load(self, image: Mapping[int, int]) -> None:
        """What the crossbar holds now (registers missing from ``image`` are unknown, so
        the next plan writes them)."""
        cur, known = self._current, self._known
        for i, addr in enumerate(self._addr):
            value = image.get(addr)
            if value is None:
                known[i] = 0
                cur[i] = 0
            else:
                known[i] = 1
                cur[i] = value
        self._all_known = all(addr in image for addr in self._addr)

    def _owner_id(self, owner: str) -> int:
        ids = self._owners
        oid = ids.get(owner)
        if oid is None:
            if len(ids) >= 1 << 20:  # forget VMs long gone: re-copy every port
                ids.clear()
                self._last = [None] * self.n_ports
            oid = ids[owner] = len(ids)
        return oid

    def _copy_demand(self, demand: Sequence[PortDemand]) -> None:
        check_demand(demand, self.n_ports)
        last, cd = self._last, self._demand
        for p, d in enumerate(demand):
            if d is last[p]:
                continue
            c = cd[p]
            try:
                c.owner = -1 if d.owner is None else self._owner_id(d.owner)
                c.priority = d.priority
                c.guaranteed_mbps = d.guaranteed_mbps
                c.limit_mbps = d.limit_mbps
                c.keys = d.keys
            except (OverflowError, TypeError) as e:
                last[p] = None
                raise FabricError(
                    f"port {p} demand {d} does not fit the fast path's integer fields ({e})",
                    port=p,
                ) from None
            last[p] = d

    def plan(self, demand: Sequence[PortDemand]) -> list[tuple[int, int]]:
        """The minimal write list (address order, no commit) from the image last loaded or
        applied to the one ``demand`` implies. Raises :class:`FabricError` for demand the
        crossbar cannot encode (C bounds checks)."""
        self._copy_demand(demand)
        return self._reconfigure()

    def _reconfigure(self) -> list[tuple[int, int]]:
        """One C call: the image of the demand in C into the target, and the write list from
        the current image to it."""
        rc = self._lib.sf_xbar_reconfigure(
            self._params,
            self._demand,
            self.n_ports,
            self._current,
            self._ffi.NULL if self._all_known else self._known,
            self._target,
            self._regs,
            self._writes,
            self._regs,
            self._n_writes,
            self._err,
        )
        if rc:
            raise fabric_error(self._err, "register image")
        w = self._writes
        return [(w[i].addr, w[i].value) for i in range(self._n_writes[0])]

    def applied(self) -> None:
        """The last plan's writes are on the crossbar: it now holds the planned image."""
        self._ffi.memmove(self._current, self._target, self._regs * 4)
        self._all_known = True

    def target(self, demand: Sequence[PortDemand]) -> dict[int, int]:
        """The full register image ``demand`` implies (address -> value)."""
        self._copy_demand(demand)
        rc = self._lib.sf_xbar_image(
            self._params, self._demand, self.n_ports, self._target, self._regs, self._err
        )
        if rc:
            raise fabric_error(self._err, "register image")
        return self._target_image()

    def _target_image(self) -> dict[int, int]:
        t = self._target
        return {addr: t[i] for i, addr in enumerate(self._addr)}


def image_planner(device: Device) -> ImagePlanner | CImagePlanner:
    """The planner the fabric driver uses: C unless ``SLICEFAB_FASTPATH=0``."""
    return CImagePlanner(device) if enabled() else ImagePlanner(device)


def image_from_slices(
    device: Device,
    slices: Sequence[tuple[str, int, int, int, int, Sequence[int]]],
    current: Mapping[int, int],
) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """From a slice table, in C: per-port demand → register image → minimal write list
    against ``current``. Slices are ``(owner, priority, guaranteed_mbps, max_mbps, key,
    ports)``; the C twin of ``image.demand_from_slices`` + ``port_configs`` +
    ``register_image`` + ``diff`` (what the differential tests compare).

    Raises :class:`FabricError` naming the slice and field that is out of range."""
    planner = CImagePlanner(device)
    ffi, lib, err = planner._ffi, planner._lib, planner._err
    owners: dict[str, int] = {}
    table = ffi.new("sf_slice[]", max(1, len(slices)))
    for i, (owner, prio, g, m, key, ports) in enumerate(slices):
        mask = 0
        for p in ports:
            if not 0 <= p < 64:
                raise FabricError(f"slice {i}: port {p} out of range 0..63", index=i, value=p)
            mask |= 1 << p
        try:
            table[i] = (owners.setdefault(owner, len(owners)), prio, g, m, key, mask)
        except (OverflowError, TypeError) as e:
            raise FabricError(f"slice {i}: a field does not fit ({e})", index=i) from None
    # the demand straight into the planner's C array, then its one reconfiguration call
    if lib.sf_xbar_demand(
        planner._params, table, len(slices), planner._demand, planner.n_ports, err
    ):
        raise fabric_error(err, "slice table")
    planner.load(current)
    writes = planner._reconfigure()
    return planner._target_image(), writes
