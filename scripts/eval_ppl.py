"""Token- and word-level perplexity of a model on held-out text, with strided windows.

    python scripts/eval_ppl.py outputs/debug_cpu                     # QAT model at its latest step
    python scripts/eval_ppl.py outputs/debug_cpu_nvfp4               # the converted NVFP4 checkpoint
    python scripts/eval_ppl.py HF_DIR --data corpus.jsonl --quant nvfp4-ptq
    python scripts/eval_ppl.py HF_DIR --held-out-of outputs/debug_cpu   # on that run's held-out split

MODEL: a training run / DCP step folder (the model as trained, QAT included), a float Hugging
Face directory, or an NVFP4 directory written by convert_to_nvfp4.py (read through
NVFP4Linear: its figure equals the QAT model's). Word perplexity = exp(total NLL / number of
whitespace-separated words), comparable across tokenizers. The held-out documents are the
recipe's validation split (same seed and fraction) unless --data names other text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvfp4  # noqa: E402
from nvfp4_titan.convert import ConvertError, resolve_source  # noqa: E402
from nvfp4_titan.data.tokenizer import load_tokenizer  # noqa: E402
from nvfp4_titan.evaluate import held_out_tokens, load_model, perplexity  # noqa: E402

# The data and tokenizer loaders name the recipe keys that fix their errors; here the fix is a flag.
_FLAG_FOR_KEY = {
    "set dataset.path to a local file or folder": "pass --data PATH",
    "set dataset.text_field to the field that holds the text": "pass --text-field NAME",
    "(set dataset.text_field)": "(pass --text-field NAME)",
    "set model.tokenizer_path": "pass --tokenizer PATH",
}


def _with_flags(message: str) -> str:
    for key, flag in _FLAG_FOR_KEY.items():
        message = message.replace(key, flag)
    return message


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
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, help="tokens between window starts (default: half of --seq-len)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.seq_len < 2 or a.batch_size < 1:
        p.error(f"need --seq-len >= 2 and --batch-size >= 1 (got {a.seq_len} and {a.batch_size})")
    a.stride = a.seq_len // 2 if a.stride is None else a.stride
    if not 0 < a.stride <= a.seq_len:
        p.error(
            f"need 0 < --stride <= --seq-len (a larger stride would leave tokens unscored); got --stride "
            f"{a.stride} and --seq-len {a.seq_len}"
        )
    if a.held_out_of and a.data:
        p.error("give --data or --held-out-of, not both")
    try:
        model, src = load_model(a.model)
        if a.quant == "nvfp4-ptq":
            if nvfp4.qat_linears(model) or any(isinstance(m, nvfp4.NVFP4Linear) for m in model.modules()):
                raise ConvertError(f"{a.model} is already quantized; --quant nvfp4-ptq takes a float model")
            nvfp4.prepare(model, nvfp4.QATConfig())
        tok_path = a.tokenizer or (src.config.model.tokenizer_path if src and src.config else a.model)
        tok = load_tokenizer(tok_path)
        recipe = src.config if src else None
        if a.held_out_of:
            try:
                recipe = resolve_source(a.held_out_of).config
            except ConvertError as e:
                raise ConvertError(f"--held-out-of {a.held_out_of}: not a training run ({e})") from None
            if recipe is None:
                raise ConvertError(
                    f"--held-out-of {a.held_out_of}: not a training run, so no recipe names a held-out split"
                )
        if a.seq_len > model.args.max_seq_len:
            raise ConvertError(f"--seq-len {a.seq_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
        if tok.vocab_size > model.args.vocab_size:
            raise ConvertError(
                f"the tokenizer {tok_path} has {tok.vocab_size} tokens, more than the model's "
                f"vocab_size {model.args.vocab_size}: name the model's own with --tokenizer"
            )
        ids, n_words = held_out_tokens(recipe, a.data, a.text_field, tok)
    except (ValueError, OSError) as e:
        print(f"error: {_with_flags(str(e))}", file=sys.stderr)
        return 2
    model.to(a.device).eval()
    r = perplexity(model, ids.to(a.device), n_words, a.seq_len, a.stride, a.batch_size)
    print(
        f"{a.model}: word_ppl {r['word_ppl']:.6f}  token_ppl {r['token_ppl']:.6f}  "
        f"({r['tokens']} tokens, {r['words']} words, quant={a.quant})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
