"""NVFP4 quantization-aware training, in rooms as torchao's ``quantization/qat``: ``config``
(``QATConfig``), ``autograd`` (the QAT linear's forward and straight-through backward, eager and
compiled), ``linear`` (``NVFP4QATLinear``), ``api`` (prepare, calibrate, set_enabled, convert).
The public names are exported by ``nvfp4``."""
