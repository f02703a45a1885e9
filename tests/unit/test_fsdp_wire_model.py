"""The FSDP step model of benchmarks/fsdp_wire_model.py: at its crossover bandwidth both
all-gathers give the same step time, below it the NVFP4 one is faster, above it slower. (Its
byte counts are checked against measured all-gathers in tests/distributed/test_nvfp4_all_gather.py.)"""

import pytest

from benchmarks.fsdp_wire_model import RECORD, StepTimes, crossover_gbs, step_seconds
from nvfp4_titan.models.llama3 import FLAVORS


@pytest.mark.parametrize("flavor,gpus", [("1B", 2), ("1B", 16), ("8B", 64)])
@pytest.mark.parametrize("times", [RECORD, StepTimes(0.2, 0.3, 0.0)], ids=["record", "eager-only"])
def test_nvfp4_all_gather_pays_exactly_below_the_crossover(flavor, gpus, times):
    a = FLAVORS[flavor]
    b = crossover_gbs(a, gpus, times)
    bf16, fp4 = step_seconds(a, gpus, b, times)
    assert bf16 == pytest.approx(fp4, rel=1e-12)
    bf16, fp4 = step_seconds(a, gpus, 0.99 * b, times)
    assert fp4 < bf16
    bf16, fp4 = step_seconds(a, gpus, 1.01 * b, times)
    assert fp4 > bf16
