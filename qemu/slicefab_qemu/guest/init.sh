#!/bin/sh
# The guest's main program, run as root by virtme-ng's init (`vng --exec`, see
# slicefab_qemu/config.py) once the guest has booted over the host's root file system:
#
#   init.sh GUEST_DIR STATE_DIR PYTHON
#
# GUEST_DIR  the host directory the launcher prepared for this VM (its credential)
# STATE_DIR  the firmware's state directory, hidden from the guest once the credential
#            is copied: the guest shares the host's root, and that directory holds the
#            ledger, every VM's credential and every VM's mailbox file
# PYTHON     the project's Python (the .venv's), for the Slicefab guest runner
#
# When this script's last command (the guest agent) exits, virtme-ng powers the guest off.
set -eu
guest_dir=$1
state_dir=$2
python=$3

# The VM's credential, where hostlib looks by default (hostlib/credentials.py).
mkdir -p /etc/slicefab /run/slicefab
install -m 0600 "$guest_dir/credential.toml" /etc/slicefab/credential.toml
if [ -d "$state_dir" ]; then
    mount -t tmpfs -o mode=0700,size=64k slicefab-hidden "$state_dir"
fi

# x86 brings hot-added vCPUs up offline; bring them online as they arrive (the memory
# counterpart is memhp_default_state on the kernel command line).
mkdir -p /etc/udev/rules.d
echo 'SUBSYSTEM=="cpu", ACTION=="add", ATTR{online}=="0", ATTR{online}="1"' \
    > /etc/udev/rules.d/80-slicefab-cpu-online.rules
udevadm control --reload 2>/dev/null || true

# The Slicefab guest runner: hostlib in one long-lived process (importing it costs
# seconds under TCG), driven by the host over a virtio-serial port.
"$python" -m slicefab_qemu.guest serve --port /dev/virtio-ports/org.slicefab.runner.0 \
    > /run/slicefab/runner.log 2>&1 &

exec qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0
