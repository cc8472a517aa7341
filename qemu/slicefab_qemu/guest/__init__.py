"""What runs inside a guest: the Slicefab guest runner and the heartbeat.

This sub-package imports ``hostlib`` and the standard library only: inside the guest a VM
has the driver and the ABI, never the firmware (DESIGN.md, "Layout"). The guest sees the
host's root file system (virtme-ng), so it runs the project's own ``.venv``.

``python -m slicefab_qemu.guest serve --port DEV``
    the runner: JSON lines on a virtio-serial port (:mod:`slicefab_qemu.guest.runner`).
    Started by ``guest/init.sh`` at boot. Why a runner at all: importing hostlib takes
    10-14 s of guest CPU under TCG on the development machine, so one long-lived process
    holds the open :class:`hostlib.Device` and times each call from inside the guest.
``python -m slicefab_qemu.guest heartbeat --period 0.01``
    ticks every period until SIGTERM, then prints the gaps it saw as JSON.
"""
