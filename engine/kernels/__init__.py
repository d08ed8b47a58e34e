"""Hand-written kernels (Triton on CUDA, torch references on CPU), one file per kernel family.

Each module carries its own Triton kernel(s), a torch reference, and a dispatch function
taking backend="auto" | "triton" | "torch". The package is named engine.kernels, not a
top-level `kernels`, which would shadow Hugging Face's `kernels` package.
"""
