"""Tokenize a corpus into the token cache that train.py memory-maps, ahead of training.

    python scripts/tokenize_corpus.py [--recipe R] [--dataset.path=CORPUS] [--model.tokenizer_path=T]
        [--dataset.text_field=text] [--dataset.cache_dir=DIR] [--dataset.num_proc=N]

Takes the recipe and overrides as train.py does (without --dataset.path: the recipe's corpus, by
default the bundled plays) and builds exactly the cache a run of them reads
(keyed by the corpus files, the text field and the tokenizer), so the first run starts at once
and a multi-node job can share one built cache. Tokenizes with dataset.num_proc processes (0:
every core this process may use); a killed build resumes from its finished parts. Prints the cache
folder and its counts; a cache that is already whole is reused, not rebuilt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_titan.data.dataset import DataError  # noqa: E402
from nvfp4_titan.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402
from nvfp4_titan.data.tokens import dataset_tokens  # noqa: E402
from nvfp4_titan.training.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="TOML recipe (its [dataset] and model.tokenizer_path are used)")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.recipe, overrides)
        d = cfg.dataset
        tok = load_tokenizer(cfg.model.tokenizer_path)
        tf = dataset_tokens(d.path, d.text_field, tok, d)
    except (ConfigError, DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: the parts tokenized so far stay in the cache folder; the same command resumes from them",
            file=sys.stderr,
        )
        return 130
    print(f"{tf.folder}: {tf.n_docs} documents, {int(tf.offsets[-1])} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
