"""Tools that read the kernels without being ops: ``lowering`` compiles them for an NVIDIA card with no GPU."""
