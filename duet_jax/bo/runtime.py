"""How the BO code runs: float64 locally, and jit with CPU compiler options that compile fast.

The BO programs are many small ops on matrices of at most a few hundred rows. On the CPU backend,
XLA's newer fusion emitters and its full LLVM optimisation take about 4x longer to compile them
and make them no faster: measured on one core, a full BO round compiled in 12.3 s with the
defaults and 3.0 s with ``CPU_COMPILER_OPTIONS``, and ran in 13.0 ms and 12.1 ms. Other backends
get XLA's defaults.
"""

from __future__ import annotations

import functools

import jax

__all__ = ["x64", "jit", "CPU_COMPILER_OPTIONS"]

CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}


def x64():
    """Context manager that turns float64 on for the BO code only (``jax.enable_x64(True)``)."""
    return jax.enable_x64(True)


def jit(fn=None, *, static_argnames=()):
    """``jax.jit`` with ``CPU_COMPILER_OPTIONS`` when the default backend is the CPU."""
    if fn is None:
        return functools.partial(jit, static_argnames=static_argnames)
    jitted: dict[str, object] = {}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        backend = jax.default_backend()
        f = jitted.get(backend)
        if f is None:
            opts = CPU_COMPILER_OPTIONS if backend == "cpu" else None
            f = jitted[backend] = jax.jit(fn, static_argnames=static_argnames,
                                          compiler_options=opts)
        return f(*args, **kwargs)

    return call
