"""(a) Simulated GPU memory of FullRes / HalfRes / PatchDDM, training and one network
evaluation, the paper's recipe against the engine's configurations, at the paper's sizes.

Each benchmark times one full-size simulation (which should take seconds) and stores the
simulated peaks in ``benchmark.extra_info``; the session prints and writes them as one
table beside the paper's figures (see conftest.py).
Run: ``pytest benchmarks/test_bench_memory.py --benchmark-only``.
"""
from __future__ import annotations

import pytest

from patchddm_fast.analysis import simulate
from paper_table import CONFIGS, PAPER_SIZES, row
from patchddm_fast.analysis.simulate import _simulate_cached

CASES = [(method, mode, label, recipe, over)
         for method in ("fullres", "halfres", "patchddm")
         for mode in ("train", "sample")
         for label, recipe, over in CONFIGS[mode]]


@pytest.mark.parametrize("method,mode,label,recipe,over", CASES,
                         ids=[f"{p}-{m}-{lab.replace(' ', '_')}" for p, m, lab, _, _ in CASES])
def test_simulated_memory(benchmark, bench_results, method, mode, label, recipe, over):
    def run():
        _simulate_cached.cache_clear()  # time a real simulation, not the cache
        return simulate(method, mode, size=PAPER_SIZES[(method, mode)], recipe=recipe, **over)

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    r = row(method, mode, label, report)
    benchmark.extra_info.update({k: v for k, v in r.items() if k != "top_allocations"})
    bench_results["memory"].append(r)
    assert report.peak_allocated_bytes > report.totals["weights"]
