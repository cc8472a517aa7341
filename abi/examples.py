"""One example request and response per command, with fixed values.

They are the source of the golden byte vectors (``tests/data/abi/make_golden.py`` writes
``tests/data/abi/<opcode>_<name>_{req,rsp}.bin`` from them; ``tests/test_abi_golden.py``
checks that the bytes do not drift) and of the examples in ``docs/abi/commands.md``.
The values describe the default device (64 cores in 8 clusters, 64 GiB in 2 MiB granules,
4 × x8 PCIe ports with two x4 NVMe SSDs, 16 keys, 16 × 100 Gbit/s crossbar ports).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from abi.fmapi import slice_tag
from abi.layout import Payload
from abi.vendor import ABI_VERSION

GiB = 1 << 30
MiB = 1 << 20
GRANULE = 2 * MiB
#: the tag every golden message carries
TAG = 0x5A

_SPEC: Payload = {
    "name": "web",
    "cores": {"count": 4, "same_cluster": True, "ids": None},
    "memory": {"size": 4 * GiB, "contiguous": False},
    "lanes": {"width": 4, "first": None, "endpoint": "nvme0"},
    "key": None,
    "ports": 1,
    "qos": {"priority": 5, "guaranteed_mbps": 10_000, "maximum_mbps": 25_000},
}

_SLICE: Payload = {
    "id": 7,
    "owner": "vm-a",
    "state": "active",
    "spec": _SPEC,
    "alloc": {
        "cores": [8, 9, 10, 11],
        "extents": [{"start": 0, "length": 1536}, {"start": 4096, "length": 512}],
        "lanes": {"port": 0, "first": 0, "width": 4},
        "key": 3,
        "ports": [2],
    },
    "granule_bytes": GRANULE,
}

_POLICY: Payload = {
    "slice": 7,
    "resource": "memory",
    "enabled": True,
    "predictive": True,
    "minimum": 2 * GiB,
    "maximum": 16 * GiB,
    "step": 1 * GiB,
    "cooldown_s": 300,
    "app_class": "web",
}

_SLICE_2: Payload = {
    "id": 9,
    "owner": "vm-a",
    "state": "active",
    "spec": {
        "name": "",
        "cores": {"count": 2, "same_cluster": False, "ids": [32, 33]},
        "memory": None,
        "lanes": None,
        "key": 3,
        "ports": 0,
        "qos": {"priority": 0, "guaranteed_mbps": 0, "maximum_mbps": 0},
    },
    "alloc": {"cores": [32, 33], "extents": [], "lanes": None, "key": 3, "ports": []},
    "granule_bytes": GRANULE,
}

_UTILISATION: Payload = {
    "cores": {"used": 6, "total": 64},
    "memory_granules": {"used": 2048, "total": 32768},
    "lanes": {"used": 4, "total": 32},
    "keys": {"used": 1, "total": 16},
    "ports": {"used": 1, "total": 16},
    "guaranteed_mbps": {"used": 10_000, "total": 1_600_000},
}

_COUNTERS: Payload = {"port": 2, "packets": 1_000_000, "flits": 8_000_000, "drops": 3, "stalls": 42}

_EXTENT: Payload = {
    "start_dpa": 6144 * GRANULE,
    "length": 256 * GRANULE,
    "tag": slice_tag(7),
    "shared_seq": 0,
}

_EXAMPLES: dict[int, tuple[Payload, Payload]] = {
    0x5400: (
        {},
        {
            "memory_size": 64 * GiB,
            "ld_count": 16,
            "qos_telemetry_capability": {
                "egress_port_congestion": True,
                "temporary_throughput_reduction": False,
            },
        },
    ),
    0x5401: (
        {"start_ld_id": 3, "ld_allocation_list_limit": 1},
        {
            "number_ld": 16,
            "memory_granularity": 256 * MiB,
            "start_ld_id": 3,
            "ld_allocation_list": [
                {"range_1_allocation_multiplier": 16, "range_2_allocation_multiplier": 0}
            ],
        },
    ),
    0x5402: (
        {
            "start_ld_id": 3,
            "ld_allocation_list": [
                {"range_1_allocation_multiplier": 24, "range_2_allocation_multiplier": 0}
            ],
        },
        {
            "start_ld_id": 3,
            "ld_allocation_list": [
                {"range_1_allocation_multiplier": 24, "range_2_allocation_multiplier": 0}
            ],
        },
    ),
    0x5403: (
        {},
        {
            "qos_telemetry_control": {
                "egress_port_congestion_enable": True,
                "temporary_throughput_reduction_enable": False,
            },
            "egress_moderate_percentage": 60,
            "egress_severe_percentage": 90,
            "backpressure_sample_interval": 8,
            "recmpbasis": 1000,
            "completion_collection_interval": 4,
        },
    ),
    0x5405: ({}, {"backpressure_avg_percentage": 12}),
    0x5406: (
        {"number_ld": 2, "start_ld_id": 3},
        {"start_ld_id": 3, "qos_allocation_fraction": [25, 0]},
    ),
    0x5407: (
        {"start_ld_id": 3, "qos_allocation_fraction": [51]},
        {"start_ld_id": 3, "qos_allocation_fraction": [51]},
    ),
    0x5408: (
        {"number_ld": 1, "start_ld_id": 3},
        {"start_ld_id": 3, "qos_limit_fraction": [64]},
    ),
    0x5409: (
        {"start_ld_id": 3, "qos_limit_fraction": [128]},
        {"start_ld_id": 3, "qos_limit_fraction": [128]},
    ),
    0x5604: (
        {
            "host_id": 3,
            "selection_policy": "prescriptive",
            "region_number": 0,
            "length": 256 * GRANULE,
            "tag": slice_tag(7),
            "extents": [_EXTENT],
        },
        {},
    ),
    0x5605: (
        {
            "host_id": 3,
            "flags": {
                "removal_policy": "tag_based",
                "forced_removal": False,
                "sanitize_on_release": True,
            },
            "length": 512 * MiB,
            "tag": slice_tag(7),
            "extents": [],
        },
        {},
    ),
    0xC000: ({**_SPEC, "request_id": "req-0001"}, _SLICE),
    0xC001: (
        {
            "slice": 7,
            "memory": 6 * GiB,
            "cores": None,
            "qos": {"priority": None, "guaranteed_mbps": 20_000, "maximum_mbps": None},
            "request_id": "req-0002",
        },
        _SLICE,
    ),
    0xC002: ({"slice": 7, "request_id": None}, {**_SLICE, "state": "freed"}),
    0xC003: ({"slice": 7}, _SLICE),
    0xC004: ({"start_id": 0}, {"total": 2, "next_id": 0, "slices": [_SLICE, _SLICE_2]}),
    0xC005: ({"owner": "vm-a", **_SPEC, "request_id": None}, _SLICE),
    0xC006: ({"owner": "vm-a", "start_id": 8}, {"total": 2, "next_id": 0, "slices": [_SLICE_2]}),
    0xC007: (_POLICY, _POLICY),
    0xC008: (
        {"start": 0},
        {
            "total": 1,
            "next": 0,
            "compositions": [
                {
                    "id": "c1",
                    "state": "lost",
                    "parts": [
                        {
                            "device": "dev0",
                            "state": "active",
                            "cores": 64,
                            "memory": 64 * GiB,
                            "nvme": 1,
                            "slices": [3, 4],
                            "reason": "",
                        },
                        {
                            "device": "dev2",
                            "state": "lost",
                            "cores": 16,
                            "memory": 32 * GiB,
                            "nvme": 0,
                            "slices": [],
                            "reason": "the device left the pool (its lease expired)",
                        },
                    ],
                }
            ],
        },
    ),
    0xC100: (
        {},
        {
            "name": "sf-dpu0",
            "model": "Slicefab SF-64 (emulated)",
            "abi_version": ABI_VERSION,
            "clusters": [8] * 8,
            "memory_bytes": 64 * GiB,
            "granule_bytes": GRANULE,
            "max_extents_per_slice": 64,
            "port_lanes": [8, 8, 8, 8],
            "endpoints": [
                {"name": "nvme0", "kind": "nvme", "port": 0, "first_lane": 0, "width": 4},
                {"name": "nvme1", "kind": "nvme", "port": 1, "first_lane": 8, "width": 4},
            ],
            "keys": 16,
            "crossbar_ports": 16,
            "port_mbps": 100_000,
            "data_width_bits": 512,
            "clock_mhz": 250,
        },
    ),
    0xC101: (
        {},
        {
            "clusters": [{"size": 8, "free": 4}] + [{"size": 8, "free": 8}] * 7,
            "held": [8, 9, 10, 11],
        },
    ),
    0xC102: (
        {},
        {
            "memory_bytes": 64 * GiB,
            "granule_bytes": GRANULE,
            "free_granules": 30720,
            "largest_free_granules": 28672,
            "max_extents_per_slice": 64,
            "held_granules": 2048,
        },
    ),
    0xC103: (
        {},
        {
            "ports": [{"lanes": 8, "free": 4}] + [{"lanes": 8, "free": 8}] * 3,
            "endpoints": [
                {
                    "name": "nvme0",
                    "kind": "nvme",
                    "port": 0,
                    "first_lane": 0,
                    "width": 4,
                    "free": False,
                },
                {
                    "name": "nvme1",
                    "kind": "nvme",
                    "port": 1,
                    "first_lane": 8,
                    "width": 4,
                    "free": True,
                },
            ],
        },
    ),
    0xC104: ({}, {"total": 16, "free": 15, "held": [3]}),
    0xC105: (
        {},
        {
            "total": 16,
            "free": 15,
            "port_mbps": 100_000,
            "held": [{"port": 2, "guaranteed_mbps": 10_000, "maximum_mbps": 25_000}],
        },
    ),
    0xC200: (
        {"client_nonce": bytes(range(16))},
        {
            "client_nonce": bytes(range(16)),
            "boot_nonce": bytes(range(0xF0, 0x100)),
            "last_seq": 41,
            "abi_version": ABI_VERSION,
            "max_payload": 4096,
            "vm": "vm-a",
        },
    ),
    0xC201: ({"data": b""}, {"data": b""}),
    0xC300: (
        {"slice": 7},
        {
            "slice": 7,
            "state": "active",
            "cores": 4,
            "memory_bytes": 4 * GiB,
            "lane_width": 4,
            "ports": [_COUNTERS],
        },
    ),
    0xC301: (
        {},
        {"slices": 2, "utilisation": _UTILISATION, "generation": 12, "ports": [_COUNTERS]},
    ),
    0xC302: (
        {"slice": 7, "memory_used_bytes": 3 * GiB, "cores_busy_milli": 2750},
        {"slice": 7, "memory_bytes": 4 * GiB, "cores": 4},
    ),
    0xC303: (
        {"slice": 7, "after": 0},
        {
            "decisions": [
                {
                    "id": 41,
                    "at_ms": 1_767_250_800_000,
                    "slice": 7,
                    "resource": "memory",
                    "action": "reserve",
                    "before": 4 * GiB,
                    "after": 6 * GiB,
                    "reason": "forecast peak 4.8 GiB within 30 min (q90 of the same time on "
                    "past days)",
                },
                {
                    "id": 42,
                    "at_ms": 1_767_254_400_000,
                    "slice": 7,
                    "resource": "memory",
                    "action": "up",
                    "before": 6 * GiB,
                    "after": 7 * GiB,
                    "reason": "use 5.2 GiB is 87% of 6 GiB (grow at 85%)",
                },
            ]
        },
    ),
    0xC400: (
        {"start": 0},
        {
            "total": 2,
            "next": 0,
            "vms": [
                {"vm": "vm-a", "mailbox": "/dev/shm/slicefab-vm-a", "last_seq": 41, "slices": 2},
                {"vm": "vm-b", "mailbox": "/dev/shm/slicefab-vm-b", "last_seq": 0, "slices": 0},
            ],
        },
    ),
    0xC401: (
        {"vm": "vm-c", "mailbox": "/dev/shm/slicefab-vm-c"},
        {"vm": "vm-c", "key": bytes(range(32)), "mailbox": "/dev/shm/slicefab-vm-c"},
    ),
    0xC402: ({"vm": "vm-c"}, {}),
    0xC403: (
        {},
        {
            "device": "sf-dpu0",
            "slices": 2,
            "utilisation": _UTILISATION,
            "fabric": {
                "backend": "model",
                "ports": 16,
                "generation": 12,
                "syncs": 12,
                "register_writes": 96,
            },
            "ledger": {"batches": 10, "records": 14},
        },
    ),
    0xC404: ({}, {"violations": []}),
    0xC405: (
        {},
        {
            "backend": "model",
            "generation": 12,
            "syncs": 12,
            "register_writes": 96,
            "ports": [{"permission": 1 << 2, "weight": 28, "keys": 1 << 3, "tb_rate": 6_553_600}]
            + [{"permission": 0, "weight": 1, "keys": 0, "tb_rate": 0}] * 15,
        },
    ),
}
_EXAMPLES[0x5404] = (_EXAMPLES[0x5403][1], _EXAMPLES[0x5403][1])

#: opcode -> (example request payload, example response payload)
EXAMPLES: Mapping[int, tuple[Payload, Payload]] = MappingProxyType(dict(sorted(_EXAMPLES.items())))

#: an error response's detail payload (ERROR_DETAIL) for the golden vectors
ERROR_EXAMPLE: Payload = {
    "field": "memory.size",
    "message": "memory: requested 40960 granules, only 30720 available",
}

__all__ = ["ERROR_EXAMPLE", "EXAMPLES", "TAG"]
