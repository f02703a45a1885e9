"""Device meshes, the Llama tensor-parallel plan, FSDP2 wrapping."""

from parallel.mesh import ParallelDims, build_mesh, resolve_dims
from parallel.parallelize import parallelize_llama

__all__ = ["ParallelDims", "build_mesh", "parallelize_llama", "resolve_dims"]
