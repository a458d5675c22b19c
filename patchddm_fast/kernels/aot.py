"""Ahead-of-time compilation of every Triton kernel variant for sm_80/86/89/90, no GPU needed.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
cap, 32))`` runs the whole Triton -> PTX -> ptxas pipeline on the host.  The resulting
cubin is inspected with the ``cuobjdump`` shipped in the triton wheel
(``--dump-resource-usage``): registers per thread, local memory per thread and static
shared memory; the dynamic shared memory Triton requests at launch comes from the
compiled kernel's metadata.  Triton kernels declare no local arrays, so any local
memory is register spill: ``spills`` reports those bytes per thread (target: 0).

Compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``), so a second run only re-reads cubins.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from . import average_skip, fused_conv3d, gn_silu
from ._triton import KernelVariant

ARCHS = (80, 86, 89, 90)
DTYPES = ("fp32", "fp16", "bf16")
LAYOUTS = ("cf", "cl")
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# One SASS instruction: /*addr*/ [@predicate] OPCODE[.modifiers] operands
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?([^;]*);")
# Instruction classes of the cost model: tensor core, fp32 CUDA core, SFU, memory.
SASS_CLASSES = {
    "mma": ("HMMA", "HGMMA", "IMMA"),
    "ffma": ("FFMA",), "fmul": ("FMUL",), "fadd": ("FADD",),
    "fp_other": ("FSEL", "FSETP", "FMNMX", "F2FP", "F2F", "FCHK"),
    "mufu": ("MUFU",),
    "global": ("LDG", "STG"), "shared": ("LDS", "STS", "LDSM"),
}


def all_variants(dtypes: Sequence[str] = DTYPES, layouts: Sequence[str] = LAYOUTS
                 ) -> List[KernelVariant]:
    """Every kernel variant the ops launch on CUDA for the network, per dtype and layout."""
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"dtype {dt!r} is not one of {DTYPES}")
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    # The fused convolution addresses any strides; its variants are the channels-last ones
    # the network runs, listed once whatever ``layouts`` says.  Their names contain "conv".
    return (gn_silu.aot_variants(dtypes, layouts) + average_skip.aot_variants(dtypes)
            + fused_conv3d.aot_variants(dtypes))


def cuobjdump_path() -> str:
    """The cuobjdump binary of the installed triton wheel."""
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def resource_usage(cubin: bytes, function: str) -> Dict[str, int]:
    """registers, stack, static shared and local bytes of ``function`` in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Function") and line.strip().rstrip(":").endswith(function):
            for follow in lines[i + 1:i + 3]:
                m = _RESOURCE.search(follow)
                if m:
                    reg, stack, shared, local = map(int, m.groups())
                    return dict(registers=reg, stack=stack, static_shared=shared, local=local)
    raise RuntimeError(f"cuobjdump reported no resource usage for {function!r}:\n{out}")


def _classify(ops: Sequence[str]) -> Dict[str, int]:
    counts = {name: 0 for name in SASS_CLASSES}
    for op in ops:
        for name, opcodes in SASS_CLASSES.items():
            if op in opcodes:
                counts[name] += 1
    counts["total"] = len(ops)
    return counts


def instruction_mix(cubin: bytes) -> Dict[str, object]:
    """Static SASS instruction counts per class (:data:`SASS_CLASSES`) of the one kernel in
    ``cubin``: ``kernel`` over all its code and ``mma_loop`` over the innermost loop that
    issues tensor-core instructions (the GEMM's K loop: one iteration is one [BLOCK_M,
    BLOCK_N, BLOCK_K] step per warp group; None for kernels without MMA).  Counts are per
    thread (SASS is per-thread code) and static: the loop body runs once per iteration."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump_path(), "-sass", path], check=True, capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(path)
    code = [(int(a, 16), op, rest) for a, op, _mod, rest in _SASS.findall(out)]
    loop = None
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target is None or int(target.group(1), 16) >= addr:
            continue  # not a backward branch
        body = [o for a, o, _ in code if int(target.group(1), 16) <= a <= addr]
        if any(o in SASS_CLASSES["mma"] for o in body) and (loop is None or len(body) < len(loop)):
            loop = body
    return {"kernel": _classify([op for _, op, _ in code]),
            "mma_loop": None if loop is None else _classify(loop)}


def compile_variant(variant: KernelVariant, arch: int) -> Dict[str, object]:
    """Compile ``variant`` for sm_``arch`` and report its resources (a JSON-able dict)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = variant.kernel.jit
    src = ASTSource(fn, variant.signature(), dict(variant.constexprs), variant.attrs())
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": variant.num_warps, "enable_fp_fusion": True})
    usage = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    return {
        "name": variant.name,
        "kernel": variant.kernel.__name__,
        "arch": f"sm_{arch}",
        "registers": usage["registers"],
        "spills": usage["local"],
        "stack_bytes": usage["stack"],
        "shared_bytes": int(compiled.metadata.shared) + usage["static_shared"],
        "num_warps": variant.num_warps,
        "sass": instruction_mix(compiled.asm["cubin"]),
    }


def check_compilable() -> None:
    """Raise if this process cannot compile: with TRITON_INTERPRET=1 set when triton was
    imported, triton's own library functions (used by tl.reduce) are interpreter-only."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: Triton's library is then built for the "
                           "interpreter and kernels cannot be compiled; unset it (the CPU "
                           "interpreter routing of patchddm_fast.kernels does not need it)")


def compile_all(variants: Iterable[KernelVariant], archs: Sequence[int] = ARCHS,
                progress: Optional[Callable[[int, int, str], None]] = None) -> List[Dict[str, object]]:
    """Compile every variant for every arch; ``progress(done, total, name)`` after each."""
    check_compilable()
    variants = list(variants)
    total = len(variants) * len(archs)
    rows = []
    for variant in variants:
        for arch in archs:
            rows.append(compile_variant(variant, arch))
            if progress is not None:
                progress(len(rows), total, f"{variant.name} sm_{arch}")
    return rows
