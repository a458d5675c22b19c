"""The paper's resource table beside simulated (and measured) numbers: rows, markdown, chart.

Used by the benchmarks (``benchmarks/``) to write ``benchmarks/results/memory.{md,json,png}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from patchddm_fast.analysis.memory_report import GB, MemoryReport
from patchddm_fast.analysis.simulate import PAPER_SIZES

# PAPER.md, "The numbers to beat" (A100 80 GB, batch 1): memory in GB, time in seconds.
PAPER_FIGURES: Dict[str, Dict[str, float]] = {
    "fullres": dict(train_gb=78.5, sample_gb=25.7, train_s=2.12, sample_s=1.01),
    "halfres": dict(train_gb=10.5, sample_gb=4.90, train_s=0.351, sample_s=0.124),
    "patchddm": dict(train_gb=10.6, sample_gb=24.0, train_s=0.340, sample_s=1.02),
}

# Configurations the benchmark simulates per mode: (label, recipe, overrides).
CONFIGS: Dict[str, List[Tuple[str, str, Dict[str, Any]]]] = {
    "train": [("paper", "paper", {}), ("engine block", "engine", dict(checkpoint="block")),
              ("engine level", "engine", dict(checkpoint="level")),
              ("engine level+offload", "engine", dict(checkpoint="level", offload="all"))],
    "sample": [("paper", "paper", {}), ("engine", "engine", {}), ("engine tiled", "engine", dict(tiled=True)),
               ("engine tiled+offload", "engine", dict(tiled=True, offload="skips"))],
}

# The targets (live-tensor peak, batch 1, the paper's network).
TARGETS: List[Tuple[str, str, str, float, str]] = [
    ("patchddm", "train", "engine block", 2.0, "PatchDDM training on 128^3 patches"),
    ("fullres", "train", "engine level", 12.0, "FullRes training on 256^3"),
    ("patchddm", "sample", "engine", 6.0, "one network evaluation on 256^3, no offload"),
    ("patchddm", "sample", "engine tiled+offload", 3.0, "one network evaluation on 256^3, with offload"),
]

_METHOD_NAMES = {"fullres": "FullRes", "halfres": "HalfRes", "patchddm": "PatchDDM"}


def row(method: str, mode: str, label: str, report: MemoryReport) -> Dict[str, Any]:
    """One JSON-ready result row."""
    return dict(
        method=method, mode=mode, config=label, size=report.size, settings=report.settings,
        live_gb=report.peak_allocated_bytes / GB, reserved_gb=report.peak_reserved_bytes / GB,
        process_gb=report.peak_process_bytes / GB, host_gb=report.peak_host_bytes / GB,
        paper_gb=PAPER_FIGURES[method][f"{mode}_gb"], peak_where=report.peak_where,
        breakdown_gb={k: v / GB for k, v in report.breakdown.items()},
        top_allocations=[(w, b / GB) for w, b in report.top_allocations[:4]],
        recompute_fraction=report.recompute_fraction, simulated_seconds=report.simulated_seconds,
    )


def memory_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """One table: per method and mode, the paper's figure and every simulated configuration."""
    labels = {m: [c[0] for c in CONFIGS[m]] for m in CONFIGS}
    out: List[str] = []
    for mode in ("train", "sample"):
        cols = labels[mode]
        out.append(f"\n**{'Training step' if mode == 'train' else 'One network evaluation'}** "
                   "(GB = 10^9 bytes; each cell: live-tensor peak / allocator reserved + CUDA context)\n")
        out.append("| method | size | paper's figure | " + " | ".join(cols) + " |")
        out.append("|---|---|---|" + "---|" * len(cols))
        for method in ("fullres", "halfres", "patchddm"):
            cells = {r["config"]: r for r in rows if r["method"] == method and r["mode"] == mode}
            if not cells:
                continue
            size = next(iter(cells.values()))["size"]
            vals = [f"{cells[c]['live_gb']:.2f} / {cells[c]['process_gb']:.2f}" if c in cells else "-" for c in cols]
            out.append(f"| {_METHOD_NAMES[method]} | {size}^3 | {PAPER_FIGURES[method][mode + '_gb']:.1f} | "
                       + " | ".join(vals) + " |")
    out.append("\n**Targets** (live-tensor peak)\n")
    out.append("| target | configuration | reached | limit | met |")
    out.append("|---|---|---|---|---|")
    for method, mode, label, limit, text in TARGETS:
        r = next((r for r in rows if (r["method"], r["mode"], r["config"]) == (method, mode, label)), None)
        if r is not None:
            out.append(f"| {text} | {label} | {r['live_gb']:.2f} GB | {limit:.1f} GB | "
                       f"{'yes' if r['live_gb'] <= limit else 'NO'} |")
    return "\n".join(out) + "\n"


def explanation(rows: Sequence[Dict[str, Any]]) -> str:
    """Why the paper recipe's simulated numbers differ from the paper's table, with the numbers."""
    def get(method, mode, label="paper"):
        return next((r for r in rows if (r["method"], r["mode"], r["config"]) == (method, mode, label)), None)

    lines = ["\n**Reading the paper column.** The paper recipe is simulated as its reference code runs: fp16 "
             "autocast, GroupNorm32 (x.float() -> GN -> fp16) followed by nn.SiLU in fp16, fp32 no-grad inference. "
             "The paper does not say how it read memory. Its figures exceed the live-tensor count by:"]
    for method in ("fullres", "halfres", "patchddm"):
        for mode in ("train", "sample"):
            r = get(method, mode)
            if r:
                lines.append(f"- {_METHOD_NAMES[method]} {mode} {r['size']}^3: paper {r['paper_gb']:.1f} GB, live "
                             f"{r['live_gb']:.1f} GB, reserved+context {r['process_gb']:.1f} GB -> "
                             f"{r['paper_gb'] - r['process_gb']:+.1f} GB unexplained by tensors")
    gaps: Dict[int, List[float]] = {}
    for r in rows:
        if r["config"] == "paper":
            gaps.setdefault(r["size"], []).append(r["paper_gb"] - r["process_gb"])
    spans = ", ".join(f"{min(g):.1f}-{max(g):.1f} GB at {size}^3" for size, g in sorted(gaps.items(), reverse=True))
    lines.append(f"The gap grows with the volume ({spans}) in training and "
                 "inference alike, which is what convolution workspaces (cuDNN picks algorithms whose scratch "
                 "space scales with the largest activation; no tensor count sees it) and allocator fragmentation "
                 "under a near-full card would do; `patchddm profile` measures it on a GPU. With the backend's "
                 "reference op (SiLU applied before the cast back to fp16, keeping SiLU's input in fp32) the "
                 "FullRes training count would be 77.8 GB instead.")
    lines.append("\n**Where the engine's bytes go.** Training: every activation a block keeps is its input (block "
                 "checkpointing saves x and the time bias and recomputes the first convolution; level checkpointing "
                 "also lets encoder skips die once the decoder averaged them in place); the peak sits at the start "
                 "of backward of the last decoder block, where the saved full-resolution inputs (0.97 GB each at "
                 "256^3 in bf16) meet that block's recompute working set. Inference: the full-resolution skips "
                 "and a block's input and output; offloading the skips to pinned host memory and the slab-wise "
                 "executor leave two full-resolution tensors plus the inputs.")
    return "\n".join(lines) + "\n"


def write_chart(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Grouped bars of the live-tensor peak per configuration, the paper's figure as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    for ax, mode in zip(axes, ("train", "sample")):
        cols = [c[0] for c in CONFIGS[mode]]
        methods = [p for p in ("fullres", "halfres", "patchddm") if any(r["method"] == p and r["mode"] == mode for r in rows)]
        width = 0.8 / len(cols)
        for j, label in enumerate(cols):
            xs, ys = [], []
            for i, method in enumerate(methods):
                r = next((r for r in rows if (r["method"], r["mode"], r["config"]) == (method, mode, label)), None)
                if r is not None:
                    xs.append(i + (j - (len(cols) - 1) / 2) * width)
                    ys.append(r["live_gb"])
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        for i, p in enumerate(methods):
            y = PAPER_FIGURES[p][mode + "_gb"]
            ax.hlines(y, i - 0.42, i + 0.42, colors="black", linestyles="--", zorder=5,
                      label="paper's figure" if i == 0 else None)
            ax.annotate(f"paper {y:g}", (i + 0.42, y), fontsize=7, ha="right", va="bottom")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([f"{_METHOD_NAMES[p]} {PAPER_SIZES[(p, mode)]}^3" for p in methods])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("peak device memory, GB (log scale)")
        ax.set_title("training step" if mode == "train" else "one network evaluation")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Simulated live-tensor peak, batch 1 (bars) vs the paper's table (black)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
