"""Device meshes, the Llama tensor-parallel plan, FSDP2 wrapping."""

from nvfp4_titan.parallel.mesh import ParallelDims, build_mesh, dp_mesh, dp_rank, resolve_dims
from nvfp4_titan.parallel.parallelize import parallelize_llama

__all__ = ["ParallelDims", "build_mesh", "dp_mesh", "dp_rank", "parallelize_llama", "resolve_dims"]
