"""Training checkpoint (DCP, any world size) or HF directory -> NVFP4 inference checkpoint.

    python scripts/convert_to_nvfp4.py CHECKPOINT OUTPUT_DIR [--format modelopt|compressed-tensors|hf]

Streams one fused group of weights at a time from the DCP metadata and quantizes it with the
numerics of the QAT forward: the recipe's mixed-precision cast, the fused-group amax and the
recipe's QAT config, all read from the checkpoint. Writes into a temporary folder renamed
into place at the end: a failed conversion leaves no OUTPUT_DIR behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from nvfp4.export import (
    FORMATS,
)
from nvfp4.format import BLOCK_SCALE_RULES
from nvfp4_titan.convert.read import VerifyError
from nvfp4_titan.convert.source import ConvertError
from nvfp4_titan.convert.write import Options, convert_checkpoint
from nvfp4_titan.models.llama3 import CheckpointError
from nvfp4_titan.parallel.parallelize import DTYPES
from nvfp4_titan.training.config import ConfigError


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {low}")
        return int(text)

    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="DCP step folder, training run folder, or HF directory")
    p.add_argument("output", type=Path, help="new (or empty) output directory")
    p.add_argument("--format", default="modelopt", choices=(*FORMATS, "hf"))
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of unquantized tensors (default: the training param dtype)"
    )
    p.add_argument(
        "--calibration-batches",
        type=_at_least(0),
        default=8,
        help="dynamic-mode checkpoints: batches that calibrate the exported input_scale (0: none)",
    )
    p.add_argument("--calibration-batch-size", type=_at_least(1), default=4)
    p.add_argument("--calibration-data", type=Path, help="corpus for calibration (default: the recipe's dataset)")
    p.add_argument("--calibration-seq-len", type=_at_least(1))
    p.add_argument(
        "--tokenizer", type=Path, help="tokenizer file or folder to copy (default: the run's model.tokenizer_path)"
    )
    p.add_argument(
        "--torchtitan",
        metavar="MODULE:FUNCTION",
        help="CHECKPOINT is a torchtitan run's; its config function (as trained with --module M --config F)",
    )
    p.add_argument(
        "--torchtitan-override",
        metavar="TARGET",
        action="append",
        default=[],
        help="with --torchtitan: an --override.imports entry the run was trained with (repeatable)",
    )
    p.add_argument(
        "--exclude",
        nargs="+",
        metavar="PATTERN",
        help="a Hugging Face CHECKPOINT (PTQ): the linears kept in high precision, fnmatch patterns of module "
        "names as qat.exclude (layers.0.feed_forward.w2; they replace its default: output lm_head *.output "
        "*.lm_head)",
    )
    p.add_argument(
        "--block-scale-rule",
        choices=BLOCK_SCALE_RULES,
        help="a Hugging Face CHECKPOINT (PTQ): how each weight block's scale is chosen (qat.block_scale_rule; "
        "default amax: block amax mapped to 6; four_over_six: to 4 where that has the smaller squared error). "
        "A training run is exported with its own rule",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.add_argument(
        "--verify",
        action="store_true",
        help="decode every weight again and compare before the output is put in place; exit 1 and write "
        "nothing on a mismatch",
    )
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.torchtitan_override and not a.torchtitan:
        p.error("--torchtitan-override needs --torchtitan MODULE:FUNCTION")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    o = Options(
        a.format,
        DTYPES[a.dtype] if a.dtype else None,
        a.calibration_batches,
        a.calibration_batch_size,
        a.calibration_data,
        a.calibration_seq_len,
        tokenizer=a.tokenizer,
        torchtitan=a.torchtitan,
        torchtitan_overrides=tuple(a.torchtitan_override),
        verify=a.verify,
        exclude=None if a.exclude is None else tuple(a.exclude),
        block_scale_rule=a.block_scale_rule,
    )
    try:
        convert_checkpoint(a.checkpoint, a.output, o, a.overwrite, log)
        print(f"wrote {a.output} ({a.format})")
        return 0
    except (ConvertError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, VerifyError) else 2
    except KeyboardInterrupt:  # convert's cleanup already ran: nothing was written
        print(f"interrupted: {a.output} was not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
