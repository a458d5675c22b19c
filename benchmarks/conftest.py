"""Shared collector of the memory / speed / GPU benchmarks and the report they write.

Benchmarks append rows to the session-wide ``bench_results`` fixture; at the end of the
session the rows are printed as one table beside the paper's figures and written to
``benchmarks/results/report.md``, ``report.json`` and ``memory.png``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

RESULTS_DIR = Path(__file__).parent / "results"
_RESULTS: Dict[str, List[Dict[str, Any]]] = {"memory": [], "speed": [], "conv": [], "gpu": []}


@pytest.fixture(scope="session")
def bench_results() -> Dict[str, List[Dict[str, Any]]]:
    return _RESULTS


def _speed_markdown(rows: List[Dict[str, Any]]) -> str:
    out = ["\n**CPU time, 64^3, the paper's full network, fp32** (median of interleaved rounds)\n",
           "| workload | paper recipe | engine | engine settings | ratio engine/paper | target |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['workload']} | {r['paper_s']:.2f} s | {r['engine_s']:.2f} s | {r['engine_settings']} | "
                   f"{r['ratio']:.2f} | <= {r['target']:.1f} ({'met' if r['ratio'] <= r['target'] else 'NOT met'}) |")
    return "\n".join(out) + "\n"


def _conv_markdown(rows: List[Dict[str, Any]]) -> str:
    out = ["\n**CPU 3D convolution, forward + backward, fp32, batch 1** (median of rounds)\n",
           "| shape | PyTorch takes slow_conv3d | PyTorch | engine | speed-up |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {'yes' if r['slow_path'] else 'no'} | {1e3 * r['pytorch_s']:.1f} ms | "
                   f"{1e3 * r['engine_s']:.1f} ms | {r['pytorch_s'] / r['engine_s']:.2f}x |")
    return "\n".join(out) + "\n"


def _gpu_markdown(rows: List[Dict[str, Any]]) -> str:
    out = ["\n**GPU measurements** (predicted = the simulator for the same settings)\n",
           "| workload | recipe | s/iter | max allocated (predicted) | max reserved (predicted) | NVML process |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['workload']} | {r['recipe']} | {r['seconds']:.3f} | {r['max_allocated_gb']:.2f} GB "
                   f"({r['predicted_allocated_gb']:.2f}) | {r['max_reserved_gb']:.2f} GB ({r['predicted_reserved_gb']:.2f}) | "
                   f"{r['nvml_gb']:.2f} GB |")
    return "\n".join(out) + "\n"


def _report_text() -> str:
    from paper_table import explanation, memory_markdown

    parts = ["# Memory and speed benchmarks\n",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with torch {torch.__version__}.\n"]
    if _RESULTS["memory"]:
        parts.append("Simulated with `patchddm_fast.analysis.simulate` (the real step on fake tensors; "
                     "allocator model; CUDA context stated as 0.54 GB).\n")
        parts.append(memory_markdown(_RESULTS["memory"]))
        parts.append(explanation(_RESULTS["memory"]))
    if _RESULTS["speed"]:
        parts.append(_speed_markdown(_RESULTS["speed"]))
    if _RESULTS["conv"]:
        parts.append(_conv_markdown(_RESULTS["conv"]))
    if _RESULTS["gpu"]:
        parts.append(_gpu_markdown(_RESULTS["gpu"]))
    return "\n".join(parts)


def pytest_sessionfinish(session, exitstatus):
    if not any(_RESULTS.values()):
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "report.md").write_text(_report_text(), encoding="utf-8")
    (RESULTS_DIR / "report.json").write_text(json.dumps(_RESULTS, indent=2, default=str), encoding="utf-8")
    if _RESULTS["memory"]:
        from paper_table import write_chart

        write_chart(_RESULTS["memory"], RESULTS_DIR / "memory.png")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if any(_RESULTS.values()):
        terminalreporter.write_sep("=", "memory / speed report (also in benchmarks/results/report.md)")
        terminalreporter.write_line(_report_text())
