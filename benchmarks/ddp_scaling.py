"""Data-parallel scaling of the paper's PatchDDM network (issue 11): a model, and the simulator.

Writes ``benchmarks/results/ddp_scaling.json`` and ``.md``:

* the scaling model of :mod:`patchddm_fast.analysis.scaling` for 1/2/4/8 GPUs with NCCL over
  NVLink and over 100 Gb/s Ethernet (bytes all-reduced, overlap with backward, step time
  from the paper's measured 0.340 s/iteration on one A100);
* the simulated per-rank training peak at 128^3 with and without DDP's gradient buckets
  (paper recipe and engine recipe).

Run: ``python benchmarks/ddp_scaling.py`` (CPU only, about a minute).
"""
from __future__ import annotations

import json
from pathlib import Path

from patchddm_fast.analysis import simulate
from patchddm_fast.analysis.scaling import format_table, scaling_table

OUT = Path(__file__).parent / "results"


def main() -> None:
    table = scaling_table()
    memory = []
    for recipe in ("paper", "engine"):
        for ddp in (False, True):
            r = simulate("patchddm", "train", size=128, recipe=recipe, steps=1, warm_start=True, ddp=ddp)
            memory.append(dict(recipe=recipe, ddp=ddp, peak_allocated_gb=r.peak_allocated_bytes / 1e9,
                               peak_process_gb=r.peak_process_bytes / 1e9,
                               gradients_gb=r.breakdown["gradients"] / 1e9, settings=r.settings))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ddp_scaling.json").write_text(json.dumps(dict(model=table, memory=memory), indent=1))
    lines = ["# Data-parallel scaling of the paper network (PatchDDM, 128^3 patches, batch 1 per GPU)", "",
             format_table(table), "", "| recipe | DDP buckets | peak allocated | peak process | gradients at peak |",
             "|---|---|---|---|---|"]
    for m in memory:
        lines.append(f"| {m['recipe']} | {'yes' if m['ddp'] else 'no'} | {m['peak_allocated_gb']:.2f} GB | "
                     f"{m['peak_process_gb']:.2f} GB | {m['gradients_gb']:.3f} GB |")
    (OUT / "ddp_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
