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
