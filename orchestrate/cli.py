"""The `flaxlm` command: a thin dispatcher to each stage's entry point.

Each subcommand names a `module:function` that takes the remaining argv; modules are
imported only when their command runs, so `flaxlm --help` is instant.

On a CPU-only host, `flaxlm COMMAND --cores-as-devices N ...` makes N host devices, one
per core (train/cpu.py); with `mesh.data=-1` (the default) training is then data parallel
over them, which is faster for small models.

Multi-host: every host runs the same command. Before the command runs, the flags
`--coordinator HOST:PORT --num-processes N --process-id I [--init-timeout S]` (or the
FLAXLM_* / SLURM / Cloud TPU environment) start JAX's distributed runtime; see
train/distributed.py. On one host they are not needed.
"""

from __future__ import annotations

import importlib
import sys

from configs import stages

# name -> (entry point "module:function", one-line help). A new command is one line here;
# a new training stage is one entry in configs/stages.py.
COMMANDS: dict[str, tuple[str, str]] = {
    **{s: (f"{stages.BY_NAME[s].module}:main", stages.BY_NAME[s].help) for s in stages.COMMANDS},
    "quicktrain": (
        "train.synthetic:main",
        "train a preset for a few steps on synthetic tokens and print the loss",
    ),
    "sample": ("train.sample:main_sample", "generate completions from a checkpoint"),
    "chat": ("train.sample:main_chat", "chat with a checkpoint in the terminal"),
    "tokenizer": ("train.data.tokenizer_cli:main", "train a sentencepiece tokenizer"),
    "compile": (
        "train.aot:main",
        "compile a config's train step ahead of time and report memory per device",
    ),
    "score": ("train.reward:score_main", "print a trained reward model's reward for a response"),
    "pipeline": (
        "orchestrate.pipeline:main",
        "run every stage, tokenizer to RLHF and a report, in one resumable workdir",
    ),
    "rlhf-eval": ("rlhf.evaluate_cli:main", "held-out RLHF eval: oracle, RM, KL, best-of-n"),
    "export-hf": ("train.hf_cli:export_main", "export a checkpoint as a Hugging Face Llama model"),
    "import-hf": ("train.hf_cli:import_main", "import a Hugging Face Llama model as a checkpoint"),
    "import-gguf": ("train.gguf_cli:main", "import a llama.cpp GGUF file as a checkpoint"),
    "label": ("rlhf.label_server:main", "rank sampled responses yourself on a local web page"),
    "sweep": ("orchestrate.sweep:main", "run an ablation's arms x seeds (paired), then its report"),
    "report": ("orchestrate.report:main", "tables with 95% CIs and plots for a sweep directory"),
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
    from train import cpu, distributed  # light: jax is imported only when it initializes

    try:
        rest = cpu.take_cores_as_devices_flag(rest)  # before anything starts JAX's backend
    except (ValueError, RuntimeError) as err:  # a bad count, or a backend that is not CPU
        print(f"flaxlm {name}: error: {err}", file=sys.stderr)
        return 2
    try:
        rest = distributed.start(rest)
    except distributed.StartupError as err:
        print(f"flaxlm {name}: error: {err}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
