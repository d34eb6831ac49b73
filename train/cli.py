"""The `flaxlm` command: a thin dispatcher to each stage's entry point.

Each subcommand names a `module:function` that takes the remaining argv; modules are
imported only when their command runs, so `flaxlm --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

# name -> (entry point "module:function", one-line help). Later stages add lines here.
COMMANDS: dict[str, tuple[str, str]] = {
    "quicktrain": (
        "train.synthetic:main",
        "train a preset for a few steps on synthetic tokens and print the loss",
    ),
    "pretrain": ("train.pretrain:main", "pretrain a model on next-token prediction"),
    "tokenizer": ("train.data.tokenizer_cli:main", "train a sentencepiece tokenizer"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: flaxlm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in sorted(COMMANDS.items())]
    lines += ["", "Run `flaxlm COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flaxlm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
