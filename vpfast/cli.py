"""The ``vpfast`` command line: one argparse subcommand per task.

Each subcommand is declared by an ``_add_<name>`` function that adds its parser and sets
``handler``, a function taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from vpfast.version import __version__


def _info(args: argparse.Namespace) -> int:
    from vpfast import info

    report = info.collect()
    print(json.dumps(report, indent=2) if args.json else info.format_report(report))
    if args.kernels or args.kernels_json:
        from vpfast import aot

        kernels = aot.run()
        print(aot.format_table(kernels))
        if args.kernels_json:
            print(f"kernel report written to {aot.write_json(kernels, args.kernels_json)}")
    return 0


def _add_info(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "info", help="versions, devices, the compiled extension and the backend of every op"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--kernels", action="store_true",
                        help="compile every GPU kernel for sm_80/sm_90 (no GPU needed) and print registers, "
                             "spills and load/store widths")
    parser.add_argument("--kernels-json", metavar="PATH", help="also write the kernel report as JSON to PATH")
    parser.set_defaults(handler=_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpfast", description="Fast visual prompting of frozen models.")
    parser.add_argument("--version", action="version", version=f"vpfast {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_info(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vpfast`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)
