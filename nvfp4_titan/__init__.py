"""The training recipe around the ``nvfp4`` numerics: Llama models, data, parallelism (TP, FSDP2),
the training loop and DCP checkpoints, and the converter to NVFP4 Hugging Face checkpoints. One
namespace so that installing the project adds no generic top-level names (``data``, ``models``)
that would shadow a user's own packages."""
