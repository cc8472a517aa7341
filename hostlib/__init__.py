"""Slicefab host driver library: what a VM uses to talk to the offload device.

==========================  ================================================================
``hostlib.client``          :class:`Device` (blocking) and :class:`AsyncClient` (asyncio): the
                            secure allocation API, with friendly results (:class:`SliceInfo`)
``hostlib.errors``          the exception tree, rooted at :class:`SlicefabError`
``hostlib.credentials``     the credential file the administrator hands to a VM
``hostlib.discovery``       finding the mailbox: ivshmem PCI device (pyudev) or host file
``hostlib.transport``       the transport interface and its errors (shared with the firmware)
``hostlib.mailbox``         the shared-memory BAR mailbox
``hostlib.socket_transport``  the Unix socket (admin tools)
``hostlib.netslice``        network slices on the host: veth pair + tbf shaping (pyroute2;
                            imported on its own: ``import hostlib.netslice``)
==========================  ================================================================

Quick start (docs/guide-vm.md)::

    from hostlib import Device

    with Device.open() as dev:                  # $SLICEFAB_CREDENTIALS or /etc/slicefab/
        s = dev.allocate(cores=4, memory="4 GiB")
        dev.resize(s.id, memory="6 GiB")
        dev.free(s.id)

hostlib imports ``abi`` and nothing else of Slicefab: a VM has only the driver and the ABI.
"""

from hostlib.client import (
    AsyncClient,
    Device,
    DeviceInfo,
    Endpoint,
    Extent,
    LaneGroup,
    LdShare,
    PortCounters,
    QoS,
    Session,
    SliceInfo,
    SliceTelemetry,
)
from hostlib.credentials import Credential, load_credential
from hostlib.discovery import find_mailbox, find_mailboxes
from hostlib.errors import (
    AllocationError,
    AuthError,
    CredentialError,
    DeviceError,
    DeviceNotFound,
    FrameTooLarge,
    IdempotencyConflict,
    InsufficientResources,
    LifecycleError,
    MailboxLayoutError,
    NetSliceError,
    NotFound,
    PeerClosed,
    PermissionDenied,
    ProtocolError,
    RateLimited,
    RequestError,
    ResourceConflict,
    SlicefabError,
    TransportError,
    TransportTimeout,
    error_from_dict,
)

__all__ = [
    "AllocationError",
    "AsyncClient",
    "AuthError",
    "Credential",
    "CredentialError",
    "Device",
    "DeviceError",
    "DeviceInfo",
    "DeviceNotFound",
    "Endpoint",
    "Extent",
    "FrameTooLarge",
    "IdempotencyConflict",
    "InsufficientResources",
    "LaneGroup",
    "LdShare",
    "LifecycleError",
    "MailboxLayoutError",
    "NetSliceError",
    "NotFound",
    "PeerClosed",
    "PermissionDenied",
    "PortCounters",
    "ProtocolError",
    "QoS",
    "RateLimited",
    "RequestError",
    "ResourceConflict",
    "Session",
    "SliceInfo",
    "SliceTelemetry",
    "SlicefabError",
    "TransportError",
    "TransportTimeout",
    "error_from_dict",
    "find_mailbox",
    "find_mailboxes",
    "load_credential",
]
