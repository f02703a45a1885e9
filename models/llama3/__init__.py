"""Llama 3 family: model, flavors, Hugging Face interchange."""

from models.llama3.args import FLAVORS, ModelArgs, RopeScaling, flavor
from models.llama3.hf import CheckpointError, from_hf, to_hf
from models.llama3.model import Transformer

__all__ = ["FLAVORS", "CheckpointError", "ModelArgs", "RopeScaling", "Transformer", "flavor", "from_hf", "to_hf"]
