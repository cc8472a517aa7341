"""Slicefab's QEMU integration: real Linux guests that use the offload device through an
emulated PCIe BAR and see their slices appear live (docs/qemu.md).

================================  =======================================================
``slicefab_qemu.config``          a VM's hardware and the QEMU / virtme-ng command lines
``slicefab_qemu.launcher``        :class:`~slicefab_qemu.launcher.Vm`: up, down, records
``slicefab_qemu.qmp``             blocking QMP and guest-agent channels over ``qemu.qmp``
``slicefab_qemu.backend``         the firmware's QMP backend: slices become VM hardware
``slicefab_qemu.runner_client``   the host end of the guest runner
``slicefab_qemu.guest``           what runs in the guest (imports hostlib only)
``slicefab_qemu.bench``           ``slicefab bench qemu``
================================  =======================================================

This package lives in ``qemu/slicefab_qemu`` and is never called ``qemu``: that name
belongs to the ``qemu.qmp`` distribution it uses.
"""
