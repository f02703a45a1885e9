"""Sharded training checkpoint (DCP) or Hugging Face directory -> NVFP4 inference checkpoint.

    python scripts/convert_to_nvfp4.py outputs/debug_cpu outputs/debug_cpu_nvfp4 --verify
    python scripts/convert_to_nvfp4.py RUN/checkpoint/step-1000 OUT --format compressed-tensors

See ``nvfp4_titan/convert/`` (also installed as the ``nvfp4-convert`` command).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_titan.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
