"""Command line: `python -m pipeline <command> ...`; each command prints one JSON document.

Every command lives in its stage module as `add_arguments(parser)` and `run(args) -> dict`,
imported only when chosen, so `--help` stays fast and torch loads only when needed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMANDS = {
    "preprocess": ("pipeline.preprocess", "Analyse selfies, pick the training set, write crops."),
    "train": ("pipeline.train", "Train, validate and fuse a persona LoRA."),
    "portrait": ("pipeline.generate", "Render a portrait of a persona in a template's style."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        # add_help=False lets `--help` reach the command's own parser below.
        command = sub.add_parser(name, help=help_text, add_help=False)
        command.set_defaults(module_name=module_name)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(args.module_name)
    command_parser = argparse.ArgumentParser(prog=f"python -m pipeline {args.command}")
    module.add_arguments(command_parser)
    command_args = command_parser.parse_args(rest)
    try:
        summary = module.run(command_args)
    except (FileNotFoundError, ValueError) as error:
        print(json.dumps({"error": str(error)}), file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
