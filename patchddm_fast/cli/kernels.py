"""``patchddm kernels``: compile every Triton kernel for sm_80/86/89/90 without a GPU.

Reports registers, register spills (local memory bytes per thread) and shared memory of
each kernel variant the fused ops launch for the network, per architecture -- a check
that the kernels build for every supported card and stay spill-free, runnable in CI on
a machine with no GPU.  Exit status 1 if any variant spills, 2 if Triton is missing or
``TRITON_INTERPRET=1`` is set (Triton then builds its library for the interpreter only).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List


def _csv(kind: str, allowed):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind} must be a comma list of {','.join(allowed)}; "
                                             f"got {text!r}")
        return items
    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    from patchddm_fast.kernels.aot import ARCHS, DTYPES, LAYOUTS

    arch_names = [str(a) for a in ARCHS]
    p = sub.add_parser(
        "kernels", help="compile all Triton kernels for sm_80/86/89/90 (no GPU) and report resources",
        description="Compile every Triton kernel variant used by the fused ops (each activation dtype and "
        "memory layout) ahead of time for NVIDIA sm_80, sm_86, sm_89 and sm_90 with no GPU present, and "
        "report registers, spills and shared memory per kernel per architecture. Exit status 1 if any "
        "kernel spills registers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--json", action="store_true",
                   help='print {"kernels": [{"name", "arch", "registers", "spills", "shared_bytes", ...}]} '
                   "instead of a table")
    p.add_argument("--archs", type=_csv("--archs", arch_names), default=arch_names,
                   help="comma list of compute capabilities to compile for")
    p.add_argument("--dtypes", type=_csv("--dtypes", DTYPES), default=list(DTYPES),
                   help="comma list of activation dtypes whose kernel variants to compile")
    p.add_argument("--layouts", type=_csv("--layouts", LAYOUTS), default=list(LAYOUTS),
                   help="comma list of memory layouts: cf = contiguous, cl = channels-last")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    return p


def format_table(rows: List[Dict[str, object]]) -> str:
    """One line per kernel variant, registers/spills/shared bytes per architecture."""
    archs = sorted({str(r["arch"]) for r in rows})
    by_name: Dict[str, Dict[str, Dict[str, object]]] = {}
    for r in rows:
        by_name.setdefault(str(r["name"]), {})[str(r["arch"])] = r
    width = max(len("kernel variant"), *(len(n) for n in by_name))
    head = f"{'kernel variant':<{width}}  " + "  ".join(f"{a + ' reg/spill/smem':>24}" for a in archs)
    lines = [head, "-" * len(head)]
    for name, per_arch in by_name.items():
        cells = []
        for a in archs:
            r = per_arch.get(a)
            cells.append(f"{r['registers']}/{r['spills']}/{r['shared_bytes']}" if r else "-")
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>24}" for c in cells))
    spilling = sum(1 for r in rows if r["spills"])
    lines.append(f"{len(by_name)} variants x {len(archs)} archs, {spilling} with spills")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        from patchddm_fast.kernels import aot
    except ImportError as exc:
        print(f"patchddm kernels: Triton is not importable ({exc}); install triton", file=sys.stderr)
        return 2

    def progress(done: int, total: int, what: str) -> None:
        print(f"\r[{done}/{total}] {what:<70}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    try:
        aot.check_compilable()
    except RuntimeError as exc:
        print(f"patchddm kernels: {exc}", file=sys.stderr)
        return 2
    variants = aot.all_variants(args.dtypes, args.layouts)
    show = not args.quiet and sys.stderr.isatty()
    if not args.quiet and not show:
        print(f"patchddm kernels: compiling {len(variants)} variants x {len(args.archs)} archs ...",
              file=sys.stderr, flush=True)
    rows = aot.compile_all(variants, [int(a) for a in args.archs], progress=progress if show else None)
    if args.json:
        print(json.dumps({"kernels": rows}, indent=1))
    else:
        print(format_table(rows))
    return 1 if any(r["spills"] for r in rows) else 0
