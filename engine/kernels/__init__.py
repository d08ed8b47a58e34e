"""Hand-written kernels (Triton on CUDA, torch references on CPU), one file per kernel family.

Each module carries its own Triton kernel(s), a torch reference, and a dispatch function
taking backend="auto" | "triton" | "torch". The package is named engine.kernels, not a
top-level `kernels`, which would shadow Hugging Face's `kernels` package.
"""


def is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1, so it runs on CPU tensors."""
    if kernel is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def check_triton_device(on_cuda: bool, interpreted: bool, triton_module) -> None:
    """One clear error for every case in which backend='triton' cannot run these tensors."""
    if triton_module is None:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not on_cuda and not interpreted:
        raise RuntimeError("backend='triton' on CPU tensors runs only under the Triton interpreter: set "
                           "TRITON_INTERPRET=1 in the environment before triton (and this module) is imported, "
                           "or use backend='torch'")
    if on_cuda and interpreted:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreted kernels take CPU tensors, not CUDA ones")
