"""``nvfp4-lm-eval`` / ``python -m nvfp4_titan.harness``: lm-eval's command line, with the
``nvfp4-titan`` model registered and the project's tasks folder as ``--include_path``.

    nvfp4-lm-eval --model nvfp4-titan --model_args path=outputs/debug_cpu --tasks shakespeare_ppl
    nvfp4-lm-eval ls tasks

The arguments are lm-eval's own (``lm-eval run --help``), subcommand optional as there.
"""

from __future__ import annotations

import sys

from nvfp4_titan.harness import TASKS, register

SUBCOMMANDS = ("run", "ls", "validate")


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments). lm-eval takes
    one ``--include_path``: one given here is refused with what to do instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        sys.exit(
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
