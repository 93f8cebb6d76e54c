"""Ahead-of-time compile of the Triton kernels for real GPUs, on any machine (no GPU needed).

`TRITON_INTERPRET=1` runs the kernels on the CPU but accepts programs a GPU compile rejects
(shared memory over the limit, dtype combinations the backend lacks, register spills). This
compiles a kernel with a launch configuration for an NVIDIA architecture (sm_80: A100, sm_90:
H100/H200) through Triton's own pipeline to a cubin, and reads back what the hardware would see:
shared memory from the compiled metadata, registers and spills from Triton's bundled `ptxas -v`.
tests/unit/test_triton_compile.py compiles every configuration the launchers can choose.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# Opt-in shared memory per block (bytes), CUDA C Programming Guide, "Technical Specifications per
# Compute Capability": 163 KB on sm_80, 227 KB on sm_90.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class Compiled:
    arch: int
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes


def _ptxas() -> str:
    import triton.backends.nvidia as nv  # noqa: PLC0415 - triton is optional (Linux only)

    return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def _ptxas_report(ptx: str, arch: int, kernel: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` of the PTX Triton emitted."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", f"-arch={target}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stderr + out.stdout
    block = text[text.index(f"Function properties for {kernel}"):]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    regs = re.search(r"Used (\d+) registers", block)
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


@functools.cache
def _compile(kernel, signature: tuple, constexprs: tuple, arch: int, num_warps: int,
             num_stages: int) -> Compiled:
    import triton  # noqa: PLC0415 - triton is optional (Linux only)
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    src = ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs))
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    regs, st, ld = _ptxas_report(c.asm["ptx"], arch, c.metadata.name)
    return Compiled(arch=arch, shared=int(c.metadata.shared), registers=regs, spill_stores=st, spill_loads=ld)


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 3) -> Compiled:
    """Compile `kernel` (a @triton.jit function) for sm_`arch`; cached within the process.

    `signature`: every runtime argument's Triton type ("*fp32", "i32", "fp64", ...); constexpr
    arguments are given in `constexprs` and marked "constexpr" here automatically.
    """
    fn = getattr(kernel, "fn", kernel)
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    jit = kernel
    order = list(jit.arg_names)
    missing = [a for a in order if a not in sig]
    if missing:
        raise ValueError(f"{fn.__name__}: no type given for {missing}")
    return _compile(jit, tuple((a, sig[a]) for a in order), tuple(sorted(constexprs.items())),
                    arch, num_warps, num_stages)
