"""Word, token and byte perplexity of a model on held-out text, as lm-evaluation-harness computes
them: its ``corpus_ppl`` task (``nvfp4_titan/harness/tasks``, wikitext's metrics) through the
``nvfp4-titan`` model.

    python scripts/eval_ppl.py outputs/debug_cpu                     # QAT model at its latest step, held-out split
    python scripts/eval_ppl.py outputs/debug_cpu_nvfp4 --held-out-of outputs/debug_cpu   # converted, same text
    python scripts/eval_ppl.py HF_DIR --data corpus.jsonl --quant nvfp4-ptq

MODEL: a training run / DCP step folder (the model as trained, QAT included), a float Hugging
Face directory, or an NVFP4 directory written by convert_to_nvfp4.py (read through NVFP4Linear:
its figure equals the QAT model's). The documents are the recipe's validation split (same seed
and fraction) unless --data names other text. Each document is scored alone, after the prefix
token, in disjoint windows of --seq-len tokens (lm-eval's rolling loglikelihood); word
perplexity = exp(total NLL / words counted as re.split(r"\\s+") counts them). The same figures:

    nvfp4-lm-eval --model nvfp4-titan --model_args path=MODEL,max_length=SEQ_LEN --tasks corpus_ppl \\
        --metadata '{"held_out_of": "RUN"}' --batch_size 4          # or '{"data": "corpus.jsonl"}'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_titan.convert import ConvertError, resolve_source  # noqa: E402
from nvfp4_titan.harness import corpus_perplexity, errors  # noqa: E402

# The harness's errors name its arguments (nvfp4_titan.harness.errors); here the fix is a flag.
_FLAG_FOR_ARGUMENT = {
    errors.DATA: "--data PATH",
    '--metadata \'{"data": "FILE.jsonl"}\'': "--data FILE.jsonl",
    errors.TEXT_FIELD: "--text-field NAME",
    errors.TOKENIZER: "--tokenizer PATH",
    "tokenizer=PATH": "--tokenizer PATH",
    "max_length=": "--seq-len ",
}


def _with_flags(message: str) -> str:
    for argument, flag in _FLAG_FOR_ARGUMENT.items():
        message = message.replace(argument, flag)
    return message


def _documents(a: argparse.Namespace) -> dict[str, str]:
    """corpus_ppl's documents: --data, else the validation split of --held-out-of or of MODEL.

    Raises:
        ConvertError: no --data, and the run named (or MODEL) is not a training run."""
    if a.data:
        return {"data": str(a.data), "text_field": a.text_field}
    run = a.held_out_of or a.model
    try:
        recipe = None if (run / "config.json").is_file() else resolve_source(run).config
    except ConvertError as e:
        recipe, why = None, f" ({e})"
    else:
        why = ""
    if recipe is None:
        if a.held_out_of:
            raise ConvertError(f"--held-out-of {a.held_out_of}: not a training run{why}")
        raise ConvertError(f"give --data or --held-out-of: {a.model} carries no recipe naming its held-out split{why}")
    return {"held_out_of": str(run)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, help="held-out corpus (default: the recipe's validation split)")
    p.add_argument(
        "--held-out-of",
        type=Path,
        metavar="RUN",
        help="score the validation split of this run's recipe (compare a float, PTQ or converted "
        "model with the run on the same text)",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the model's or the recipe's)")
    p.add_argument(
        "--quant",
        choices=("none", "nvfp4-ptq"),
        default="none",
        help="nvfp4-ptq: fake-quantize a float model's linears (weights and inputs)",
    )
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.seq_len is not None and a.seq_len < 2:
        p.error(f"need --seq-len >= 2 (got {a.seq_len})")
    if a.batch_size < 1:
        p.error(f"need --batch-size >= 1 (got {a.batch_size})")
    if a.held_out_of and a.data:
        p.error("give --data or --held-out-of, not both")
    model_args = {"path": str(a.model), "quant": a.quant}
    model_args |= {"tokenizer": a.tokenizer} if a.tokenizer else {}
    model_args |= {"max_length": a.seq_len} if a.seq_len else {}
    try:
        r = corpus_perplexity(model_args, _documents(a), a.batch_size, a.device)
    except (ValueError, OSError) as e:
        print(f"error: {_with_flags(str(e))}", file=sys.stderr)
        return 2
    print(
        f"{a.model}: word_ppl {r['word_perplexity']:.6f}  token_ppl {r['token_perplexity']:.6f}  "
        f"byte_ppl {r['byte_perplexity']:.6f}  ({r['tokens']} tokens, {r['words']} words, quant={a.quant})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
