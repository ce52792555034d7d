"""What a model of live GPU bytes leaves out, as explicit margins: precompute's `offload: auto` decides with
them at run time, and the benchmarks' memory models (bench.memory, bench.precompute_memory) add them to
their modelled peaks, so the decision and the published model use the same figures."""
MIB = 2 ** 20
GIB = 2 ** 30
MARGIN_CONTEXT = 0.5 * GIB  # the CUDA context and cuBLAS workspaces (upper end)
MARGIN_ALLOCATOR = 0.10  # caching-allocator rounding and fragmentation, as a share of the modelled peak
