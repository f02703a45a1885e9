"""Tokenizers, local corpora, packing and the resumable global-batch loader."""
