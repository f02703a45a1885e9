"""Llama 3 family: model, flavors, Hugging Face interchange."""

from nvfp4_titan.models.llama3.args import FLAVORS, ModelArgs, RopeScaling, flavor
from nvfp4_titan.models.llama3.hf import CheckpointError, from_hf, to_hf
from nvfp4_titan.models.llama3.model import Transformer

__all__ = ["FLAVORS", "CheckpointError", "ModelArgs", "RopeScaling", "Transformer", "flavor", "from_hf", "to_hf"]
