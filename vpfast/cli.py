"""The ``vpfast`` command line: one argparse subcommand per task.

Each subcommand is declared by an ``_add_<name>`` function that adds its parser and sets
``handler``, a function taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per TrainConfig field, typed from the field (the config is the single source)."""
    import dataclasses
    import typing

    from vpfast import methods
    from vpfast.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = hints[f.name]
        help_text = ""
        if kind is bool or bool in typing.get_args(kind):  # bool | None: the recipe decides unless given
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "method":  # the method registry: its names and what each one is
            parser.add_argument(flag, default=default, help=methods.describe())
        elif f.name == "model_cfg":
            parser.add_argument(flag, type=json.loads, default=default, help="a JSON object")
        elif f.name == "templates":
            parser.add_argument(flag, nargs="+", default=default, help=help_text)
        else:
            base = next((t for t in (int, float, str) if t is kind or t in typing.get_args(kind)), str)
            parser.add_argument(flag, type=base, default=default, help=help_text)


def _config(args: argparse.Namespace):
    import dataclasses

    from vpfast.train.config import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def _train(args: argparse.Namespace) -> int:
    from vpfast.train.loop import train

    results = train(_config(args), resume=args.resume)
    print(json.dumps(results, indent=2))
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="learn a visual prompt for a frozen model (EVP recipe by default)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.set_defaults(handler=_train)


def _eval(args: argparse.Namespace) -> int:
    from vpfast.train.loop import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data), indent=2))
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="test accuracy of a saved prompt")
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/evp/best")
    parser.add_argument("--data", help="evaluate on this dataset instead of the one it was trained on")
    parser.set_defaults(handler=_eval)


def _export(args: argparse.Namespace) -> int:
    from vpfast.export import export_pixel_prompts

    print(f"pixel prompts written to {export_pixel_prompts(args.run, args.out)}")
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="a trained PGN run as pixel prompts (generator + patch inverse)")
    parser.add_argument("run", help="a run directory (its best checkpoint is used) or a checkpoint directory")
    parser.add_argument("--out", help="output .safetensors (default: <run>/pixel_prompts.safetensors)")
    parser.set_defaults(handler=_export)


def _selftest(args: argparse.Namespace) -> int:
    from vpfast import selftest

    return selftest.main()


def _add_selftest(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("selftest", help="check this install: every op on CPU against its reference, "
                                                  "CUDA kernels registered")
    parser.set_defaults(handler=_selftest)


def _demo(args: argparse.Namespace) -> int:
    from vpfast import demo

    print(demo.format_table(demo.run(args.data, args.preset, args.out)))
    return 0


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="prompt a real ImageNet model to classify real digits, offline",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="mnist", choices=("mnist", "digits", "fashion-mnist"),
                        help="packaged dataset (fashion-mnist needs Debian's dataset-fashion-mnist)")
    parser.add_argument("--preset", default="quick", choices=("quick", "long"),
                        help="quick: 112 px canvas, 1,536 images, one epoch; long: all 3,600 training images, 8 epochs")
    parser.add_argument("--out", default="runs/demo", help="directory for the runs and demo.json")
    parser.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpfast", description="Fast visual prompting of frozen models.")
    parser.add_argument("--version", action="version", version=f"vpfast {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_info(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_export(commands)
    _add_selftest(commands)
    _add_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vpfast`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: say what is wrong, no traceback
        print(f"vpfast: error: {exc}", file=sys.stderr)
        return 2
