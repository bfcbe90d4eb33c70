"""`mtmm info`: versions, the device, whether the C++ core and the Triton kernels work."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from scheduler import sysinfo

    info = sysinfo.collect()
    print(json.dumps(info, indent=2) if args.json else sysinfo.format_report(info))
    return 0 if info["cpp_core"]["usable"] else 1


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, the device, whether the C++ core and kernels work")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
