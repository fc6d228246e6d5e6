"""cscompile.codegen: the lowering layer.

kernels.py   Triton kernels (decode GEMV / prefill GEMM) for reduced FFNs and head-reduced
             attention projections, their wrappers, and pure-torch `*_reference` twins.
generate.py  per-class Triton source generation and the verified loader the runtime uses.
"""
