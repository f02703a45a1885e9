"""The checkpoint converter: a training run's DCP checkpoint (any world size) or a Hugging Face
folder -> an NVFP4 Hugging Face checkpoint that engines decode exactly as trained.

``source`` reads what is converted, ``calibrate`` measures input amaxes where training did not,
``write`` writes (through ``output``'s atomic folder), ``read`` decodes and loads what was
written, ``cli`` is the command line (``scripts/convert_to_nvfp4.py``, ``nvfp4-convert``)."""

from nvfp4_titan.convert.calibrate import calibrated_input_amax
from nvfp4_titan.convert.read import VerifyError, load_nvfp4_model, verify
from nvfp4_titan.convert.source import (
    ConvertError,
    Source,
    build_model,
    qat_groups,
    quantized_groups,
    resolve_source,
)
from nvfp4_titan.convert.write import (
    Options,
    check_exportable,
    convert_checkpoint,
    write_checkpoint,
)

__all__ = [
    "ConvertError",
    "Options",
    "Source",
    "VerifyError",
    "build_model",
    "calibrated_input_amax",
    "check_exportable",
    "convert_checkpoint",
    "load_nvfp4_model",
    "qat_groups",
    "quantized_groups",
    "resolve_source",
    "verify",
    "write_checkpoint",
]
