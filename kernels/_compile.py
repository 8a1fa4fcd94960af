"""Ahead-of-time compilation of the Triton kernels for an H100 (sm_90), with no GPU.

The CPU tests run the kernels in the interpreter, which accepts code the real compiler
rejects and says nothing of registers or shared memory. Compiling through the real
pipeline (Triton IR -> PTX -> ptxas) needs only triton's CUDA backend and its bundled
ptxas, so the tests and bench/kernel_resources.py compile here, in a process where
TRITON_INTERPRET is not set.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import triton

SM90 = 90


@dataclass(frozen=True)
class Specialization:
    """How a launch's arguments reach the compiler: types, constexprs, 16-aligned args."""

    types: dict[str, str]
    constexprs: dict[str, Any]
    aligned: frozenset[str]


@dataclass(frozen=True)
class Sm90Build:
    """A kernel compiled for sm_90 and what ptxas reported while assembling it."""

    compiled: Any
    ptxas_log: str


def cuda_backend_available() -> bool:
    """Whether this triton has its nvidia backend, so it can compile for CUDA (whether
    ptxas runs shows at the compile itself)."""
    try:
        from triton.backends.compiler import GPUTarget
        import triton.backends.nvidia  # noqa: F401
        GPUTarget("cuda", SM90, 32)
    except ImportError:
        return False
    return True


def jit_function(kernel: Any) -> triton.runtime.JITFunction:
    """The JITFunction under an autotuner (or any wrapper exposing `.fn`)."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def specialize(kernel: Any, args: Sequence, kwargs: Mapping[str, Any]) -> Specialization:
    """The specialization a real launch with these argument values compiles under.

    Uses triton's own rule (the one `kernel[grid](...)` applies): tensors become typed
    pointers, ints equal to 1 become constexprs, pointers and ints divisible by 16 are
    marked aligned. Tensors may live on the meta device: only dtype and address matter.
    """
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = jit_function(kernel)
    values = dict(zip(fn.arg_names, args)) | dict(kwargs)
    types, constexprs, aligned = {}, {}, set()
    for param in fn.params:
        name = param.name
        if name not in values:
            raise ValueError(f"{fn.__name__}: launch gives no value for {name!r}")
        if param.is_constexpr:
            constexprs[name] = values[name]
            continue
        kind, attr = native_specialize_impl(BaseBackend, values[name], param.is_const,
                                            not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            constexprs[name] = attr
            continue
        types[name] = kind
        if attr == "D":
            aligned.add(name)
    return Specialization(types, constexprs, frozenset(aligned))


def compile_sm90(kernel: Any, types: Mapping[str, str], constexprs: Mapping[str, Any], *,
                 aligned: Iterable[str] = (), num_warps: int = 4,
                 num_stages: int = 3) -> Sm90Build:
    """Compile `kernel` for sm_90 through the real pipeline and keep ptxas's report.

    Arguments missing from both `types` and `constexprs` compile as i32, and `types` may
    name arguments the kernel lacks (one dict can serve several kernels); `aligned` names
    the arguments known to be multiples of 16 (pointers and strides of real launches).
    The compile bypasses triton's cache, so ptxas always runs and always reports.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton import knobs

    fn = jit_function(kernel)
    names = fn.arg_names
    aligned = set(aligned)
    unknown = (set(constexprs) | aligned) - set(names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                 for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn, signature, attrs=attrs,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=GPUTarget("cuda", SM90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    return Sm90Build(compiled, log.getvalue())
