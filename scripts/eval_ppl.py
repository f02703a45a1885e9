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
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvfp4  # noqa: E402
from data.dataset import load_documents, validation_ids  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from models.llama3 import Transformer, from_hf  # noqa: E402
from training.config import Config  # noqa: E402
from training.convert import ConvertError, Source, build_model, load_nvfp4_model, resolve_source  # noqa: E402
from training.loss import cross_entropy  # noqa: E402


def load_model(path: Path) -> tuple[Transformer, Source | None]:
    """(model, source) for any supported MODEL path."""
    cfg_json = path / "config.json"
    if cfg_json.is_file() and "quantization_config" in cfg_json.read_text():
        return load_nvfp4_model(path), None
    src = resolve_source(path)
    if src.config is None:
        return from_hf(path), src
    return build_model(src, src.qat if src.config.qat.enable else None), src


def strided_windows(ids: torch.Tensor, seq_len: int, stride: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(inputs, targets, first scored position): each target token is scored exactly once."""
    out, prev_end = [], 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids) - 1)
        out.append((ids[begin:end], ids[begin + 1 : end + 1], max(0, prev_end - begin)))
        prev_end = end
        if end == len(ids) - 1:
            break
    return out


@torch.no_grad()
def perplexity(model: Transformer, ids: torch.Tensor, n_words: int, seq_len: int, stride: int,
               batch_size: int, progress: bool = True) -> dict[str, float]:
    windows = strided_windows(ids, seq_len, stride)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        for group in _same_length(windows[i : i + batch_size]):
            x = torch.stack([w[0] for w in group])
            y = torch.stack([w[1] for w in group])
            mask = torch.stack([torch.arange(len(w[1])) >= w[2] for w in group])
            losses = cross_entropy(model(x), y, reduction="none")
            nll += losses[mask.flatten()].double().sum().item()
            count += int(mask.sum())
        if progress:
            print(f"\r[{min(i + batch_size, len(windows))}/{len(windows)}] token ppl {math.exp(nll / count):.4f}",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {"tokens": count, "words": n_words, "nll": nll, "token_ppl": math.exp(nll / count),
            "word_ppl": math.exp(nll / n_words)}


def _same_length(group):
    lengths = {len(w[0]) for w in group}
    return [[w for w in group if len(w[0]) == n] for n in sorted(lengths)]


def held_out_text(cfg: Config | None, data: Path | None, text_field: str) -> list[str]:
    """The documents of ``data``, else the validation split of the recipe ``cfg`` (its seed and
    fraction)."""
    if data is not None:
        return load_documents(data, text_field)
    if cfg is None:
        raise ConvertError("give --data: this model carries no recipe naming its held-out split")
    d, t = cfg.dataset, cfg.training
    docs = load_documents(d.path, d.text_field)
    return [docs[i] for i in sorted(validation_ids(len(docs), d.validation_fraction, t.seed))]


def token_ids(tok, docs: list[str]) -> tuple[torch.Tensor, int]:
    """(the documents' token ids, each followed by EOS, as one int64 tensor; their word count)."""
    ids = torch.tensor([t for d in tok.encode_batch(docs) for t in (*d, tok.eos_id)], dtype=torch.int64)
    return ids, sum(len(d.split()) for d in docs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, help="held-out corpus (default: the recipe's validation split)")
    p.add_argument("--held-out-of", type=Path, metavar="RUN",
                   help="score the validation split of this run's recipe (compare a float, PTQ or converted "
                        "model with the run on the same text)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the model's or the recipe's)")
    p.add_argument("--quant", choices=("none", "nvfp4-ptq"), default="none",
                   help="nvfp4-ptq: fake-quantize a float model's linears (weights and inputs)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if not 0 < a.stride <= a.seq_len or a.batch_size < 1:
        p.error("need 0 < --stride <= --seq-len (a larger stride would leave tokens unscored) and --batch-size >= 1")
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
                raise ConvertError(f"--held-out-of {a.held_out_of}: not a training run, so no recipe names a "
                                   "held-out split")
        docs = held_out_text(recipe, a.data, a.text_field)
        if a.seq_len > model.args.max_seq_len:
            raise ConvertError(f"--seq-len {a.seq_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
        if tok.vocab_size > model.args.vocab_size:
            raise ConvertError(f"the tokenizer {tok_path} has {tok.vocab_size} tokens, more than the model's "
                               f"vocab_size {model.args.vocab_size}: name the model's own with --tokenizer")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids, n_words = token_ids(tok, docs)
    model.to(a.device).eval()
    r = perplexity(model, ids.to(a.device), n_words, a.seq_len, a.stride, a.batch_size)
    print(f"{a.model}: word_ppl {r['word_ppl']:.6f}  token_ppl {r['token_ppl']:.6f}  "
          f"({r['tokens']} tokens, {r['words']} words, quant={a.quant})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
