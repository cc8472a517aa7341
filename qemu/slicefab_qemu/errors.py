"""The QEMU integration's exceptions, under the firmware's root (firmware.errors), with the
root's wire code ``error``: they are host-side failures that no VM request returns (the
backend reports a failed QMP change to the manager as FabricError).

::

    SlicefabError
     └── VmError          a VM cannot be started, stopped or reached
          └── QmpFailure  QEMU (or its guest agent) answered a command with an error
"""

from __future__ import annotations

from firmware.errors import SlicefabError


class VmError(SlicefabError):
    """A VM cannot be started, stopped or reached; the message says which and why."""



class QmpFailure(VmError):
    """QEMU refused a QMP command: ``command``, QEMU's ``error_class`` and ``desc``."""


    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}", command=command,
                         error_class=error_class)
        self.command = command
        self.error_class = error_class
        self.desc = desc
