"""NVFP4 QAT inside torchtitan 0.3.0 (the ``torchtitan`` extra): a model converter, its modules, the
trainer configs and the export of a torchtitan checkpoint."""
