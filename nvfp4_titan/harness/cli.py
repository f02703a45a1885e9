"""``nvfp4-lm-eval`` / ``python -m nvfp4_titan.harness``: lm-eval's command line, with the
``nvfp4-titan`` model registered and the project's tasks folder as ``--include_path``.

    nvfp4-lm-eval --model nvfp4-titan --model_args path=outputs/debug_cpu --tasks shakespeare_ppl
    nvfp4-lm-eval ls tasks

The arguments are lm-eval's own (``lm-eval run --help``), subcommand optional as there. Bad
input (a model argument, a task's metadata, a path, a corpus, a tokenizer, a chat template) is
printed as one ``error: ...`` line, exit status 2, as ``scripts/eval_ppl.py`` does.
"""

from __future__ import annotations

import sys

from nvfp4_titan.harness import TASKS, register
from nvfp4_titan.harness.errors import BAD_INPUT, HarnessError

SUBCOMMANDS = ("run", "ls", "validate")


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments). lm-eval takes
    one ``--include_path``: one given here is refused with what to do instead. The project's
    errors for bad input (``errors.BAD_INPUT``) end it with one line on stderr and exit status 2."""
    try:
        _run(list(sys.argv[1:] if argv is None else argv))
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _run(args: list[str]) -> None:
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        raise HarnessError(
            f"nvfp4-lm-eval passes its own tasks folder ({TASKS}) as --include_path, and lm-eval takes one: "
            "put your task files in a folder beside a copy of it, or run lm_eval.simple_evaluate with "
            "nvfp4_titan.harness.task_manager() and your own TaskManager paths"
        )
    register()
    from lm_eval.__main__ import cli_evaluate

    if args and args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help"):
        args.insert(0, "run")  # lm-eval's own default subcommand (lm_eval/_cli/harness.py)
    if args and args[0] in SUBCOMMANDS:
        args[1:1] = ["--include_path", str(TASKS)]
    sys.argv = ["nvfp4-lm-eval", *args]
    cli_evaluate()
