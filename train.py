"""Train a Llama with NVFP4 QAT under FSDP2 + TP.

python train.py --recipe recipes/debug_cpu.toml [--section.key=value ...]
torchrun --nproc_per_node=8 train.py --recipe recipes/llama3_3b_qat.toml
"""

from __future__ import annotations

import argparse
import sys

from nvfp4_titan.models.llama3 import CheckpointError
from nvfp4_titan.training.checkpoint import CheckpointSaveError
from nvfp4_titan.training.config import ConfigError, help_text, load_config
from nvfp4_titan.training.runtime import teardown_and_exit

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_text(), add_help=True
    )
    p.add_argument("--recipe", help="TOML recipe; keys not in it keep their defaults")
    args, overrides = p.parse_known_args(argv)
    from nvfp4_titan.data.dataset import DataError
    from nvfp4_titan.data.tokenizer import TokenizerError
    from nvfp4_titan.parallel.mesh import ParallelConfigError
    from nvfp4_titan.training.trainer import Trainer, TrainingError

    stopped = (TrainingError, CheckpointSaveError)  # the run started, then could not go on: exit 1
    user_errors = USER_ERRORS + (DataError, TokenizerError, ParallelConfigError) + stopped
    try:
        config = load_config(args.recipe, overrides)
        return Trainer(config).run()
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, stopped) else 2
    except KeyboardInterrupt:  # before the loop's handlers (e.g. while tokenizing): nothing half-written
        print("error: interrupted before training started; run the same command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    teardown_and_exit(main(sys.argv[1:]))
