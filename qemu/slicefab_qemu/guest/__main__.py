"""``python -m slicefab_qemu.guest``: see the package docstring."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slicefab_qemu.guest")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="the guest runner on a virtio-serial port")
    s.add_argument("--port", required=True, help="e.g. /dev/virtio-ports/org.slicefab.runner.0")
    h = sub.add_parser("heartbeat", help="tick until SIGTERM, print the gaps as JSON")
    h.add_argument("--period", type=float, default=0.01, help="seconds between ticks")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        from slicefab_qemu.guest.runner import serve

        return serve(args.port)
    from slicefab_qemu.guest.heartbeat import run

    return run(args.period)


if __name__ == "__main__":
    sys.exit(main())
