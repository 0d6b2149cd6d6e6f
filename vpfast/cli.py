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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_object(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from exc


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def flag_rows() -> list[tuple[str, str, str, str, str]]:
    """(group, flag, default, accepted values, description) of every ``vpfast train`` config flag, from the schema."""
    import dataclasses

    from vpfast.train.config import TrainConfig, kind_of, range_text

    rows = []
    for f in dataclasses.fields(TrainConfig):
        base, optional = kind_of(f)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = f.metadata["default_text"] or (("on" if default else "off") if base is bool else
                                              " ".join(default) if base is list else str(default))
        kind = {bool: "flag", int: "integer", float: "number", str: "text", list: "text ...", dict: "JSON"}[base]
        accepts = range_text(f)
        if f.metadata["choices"]:
            accepts = "one of " + ", ".join(str(c) for c in f.metadata["choices"] if c is not None)
        elif accepts and not f.metadata["accepts"]:
            accepts = f"{kind} {accepts}"
        flag = f"{_flag(f.name)}/--no-{_flag(f.name)[2:]}" if base is bool else _flag(f.name)
        rows.append((f.metadata["group"], flag, shown, accepts or kind, f.metadata["help"]))
    return rows


def flag_table() -> str:
    """The README's table of ``vpfast train`` flags (tests/test_cli.py checks that the README holds this text)."""
    lines = ["| group | flag | default | accepts | what it sets |", "|---|---|---|---|---|"]
    lines += [f"| {group} | `{flag}` | {default} | {accepts} | {text} |"
              for group, flag, default, accepts, text in flag_rows()]
    return "\n".join(lines)


class _Removed(argparse.Action):
    """A flag that no longer exists: using it is an error that names its replacement (not "unrecognized")."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from vpfast.train.config import REMOVED_FIELDS

        parser.error(f"{option_string}: {REMOVED_FIELDS[self.dest]}")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per TrainConfig field, in the schema's groups, described from the schema; removed
    fields (``REMOVED_FIELDS``) stay as hidden flags whose use is an error naming the replacement.

    Defaults are suppressed: the parsed namespace holds only the flags the user typed (``explicit_flags``),
    and the config's own defaults fill in the rest.
    """
    import dataclasses

    from vpfast.train.config import GROUPS, REMOVED_FIELDS, TrainConfig, kind_of

    for name in REMOVED_FIELDS:
        parser.add_argument(_flag(name), dest=name, nargs="?", action=_Removed, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)

    groups = {name: parser.add_argument_group(f"{name} options") for name in GROUPS}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for group, flag, default, accepts, text in flag_rows():
        name = flag.split("/")[0][2:].replace("-", "_")
        base, _ = kind_of(fields[name])
        help_text = f"{text} [{accepts}; default: {default}]".replace("%", "%%")
        options = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            options.update(action=argparse.BooleanOptionalAction)
        elif base is list:
            options.update(nargs="+", metavar="TEXT")
        else:
            choices = fields[name].metadata["choices"]
            metavar = "{" + ",".join(c for c in choices if c) + "}" if choices else \
                {dict: "JSON", int: "N", float: "X", str: "TEXT"}[base]
            options.update(type={dict: _json_object, int: int, float: float, str: str}[base], metavar=metavar)
        groups[group].add_argument(_flag(name), **options)


def given_flags(args: argparse.Namespace) -> dict[str, object]:
    """The config fields the user typed, each checked (type and range) under its flag's name."""
    import dataclasses

    from vpfast.train.config import TrainConfig, check_field

    return {f.name: check_field(_flag(f.name), getattr(args, f.name), f)
            for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def explicit_flags(argv: Sequence[str]) -> dict[str, object]:
    """The config fields typed in ``vpfast train`` arguments ``argv`` (not argparse defaults), checked."""
    return given_flags(build_parser().parse_args(["train", *argv]))


def _train(args: argparse.Namespace) -> int:
    from vpfast.train.config import TrainConfig
    from vpfast.train.loop import train

    given = given_flags(args)
    if args.resume:
        from vpfast.train.resume import resume_config

        cfg = resume_config(given.get("out", TrainConfig.out), given)
    else:
        cfg = TrainConfig(**given)
    cfg.resolved()  # every value and combination checked before any work
    cfg.check_out()
    results = train(cfg, resume=args.resume)
    print(json.dumps(results, indent=2))
    return 0


TRAIN_DESCRIPTION = """Learn a visual prompt for a frozen model. The defaults reproduce EVP's released recipe on
CLIP ViT-B/32; --method picks another method and its recipe. Every value is checked before any work starts."""


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="learn a visual prompt for a frozen model (EVP recipe by default)",
                                 description=TRAIN_DESCRIPTION)
    _config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint; flags given with it change the "
                             "saved config where that is safe")
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

    print(demo.format_table(demo.run(args.data, args.preset, args.out, progress=sys.stderr.isatty(),
                                     threads=args.threads)))
    return 0


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from vpfast import demo

    parser = commands.add_parser("demo", help="prompt a real ImageNet model to classify real digits, offline",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="mnist", choices=("mnist", "digits", "fashion-mnist"),
                        help="packaged dataset (fashion-mnist needs Debian's dataset-fashion-mnist)")
    parser.add_argument("--preset", default="quick", choices=("quick", "long"),
                        help="quick: 112 px canvas, 1,536 images, one epoch; long: all 3,600 training images, 8 epochs")
    parser.add_argument("--out", default="runs/demo", help="directory for the runs and demo.json")
    parser.add_argument("--threads", type=_positive_int, default=demo.THREADS, metavar="N",
                        help="CPU threads; the accuracies are reproducible for a given count, and the README's are "
                             "at the default")
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
    except BaseException as exc:
        from vpfast.train.loop import TrainingInterrupted

        if not isinstance(exc, TrainingInterrupted):
            raise
        print(str(exc), file=sys.stderr)  # SIGINT/SIGTERM: the run saved its checkpoint; one line, no traceback
        return exc.exit_code
