"""Dice against network evaluations (NFE) per sampler and against ensemble size (the paper's Fig. 5
question on phantoms), plus wall time of batched against one-at-a-time ensemble members.

    python benchmarks/nfe_sweep.py --model RUN/last.pt --out benchmarks/results/nfe

For a checkpoint trained on phantoms (``patchddm demo`` / ``patchddm train``) it samples the
run's held-out cases (the demo's) with every sampler of :data:`patchddm_fast.diffusion.samplers.SAMPLERS`
at each NFE budget (Heun's NFE is odd, 2 x steps - 1: it gets the most steps within the budget,
and the table shows the NFE actually spent).  Ensemble members are drawn in member order from
the seeded generator, so the first k members of an M-member run are exactly the k-member
ensemble: one run per (sampler, NFE) gives every ensemble size up to M.  M is
``--nfe-ensemble`` for the NFE sweep and ``max(--ensembles)`` for the settings named in
``--ensemble-settings``.  Writes ``nfe_sweep.json``, ``nfe_sweep.md``, ``nfe_sweep.png`` and
``uncertainty.png`` (reliability diagram and AUROC of the variance for errors, reference setting).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_setting(text: str) -> Tuple[str, int]:
    from patchddm_fast.diffusion.samplers import check_sampler

    name, _, n = text.partition(":")
    if not n.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write SAMPLER:NFE, e.g. ddim:10")
    return check_sampler(name), int(n)


def build_parser() -> argparse.ArgumentParser:
    from patchddm_fast.diffusion.samplers import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="CKPT", help="checkpoint of a phantom run (demo/train)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="instead of sampling: combine the nfe_sweep.json of several partial runs (e.g. one per "
                        "sampler, run in parallel) of the same model, cases and seed into --out")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for nfe_sweep.json/.md/.png")
    p.add_argument("--cases", type=int, default=None, help="held-out cases (default: the run's phantom_val)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--nfe", nargs="+", type=int, default=[1, 2, 4, 8, 10, 20], help="NFE budgets per sample")
    p.add_argument("--ensembles", nargs="+", type=int, default=[1, 3, 5, 10], help="ensemble sizes")
    p.add_argument("--nfe-ensemble", type=int, default=10,
                   help="members sampled at every (sampler, NFE); ensemble sizes above it only for --ensemble-settings")
    p.add_argument("--ensemble-settings", nargs="*", type=parse_setting, default=None, metavar="SAMPLER:NFE",
                   help="settings sampled with max(--ensembles) members (default: every setting)")
    p.add_argument("--reference", type=parse_setting, default=("ddim", 10), metavar="SAMPLER:NFE",
                   help="the setting others are compared with (the demo's 10-step DDIM)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--timing-steps", type=int, default=10,
                   help="DDIM steps of the batched vs one-at-a-time timing (0: skip it)")
    p.add_argument("--timing-ensemble", type=int, default=5, help="members of the timing run")
    p.add_argument("--device", default="cpu")
    return p


def sweep(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from patchddm_fast.training.checkpoint import load_for_inference
    from patchddm_fast.training.config import TrainConfig
    from patchddm_fast.training.cases import read_whole
    from patchddm_fast.training.sources import load_cases
    from patchddm_fast.eval.metrics import dice
    from patchddm_fast.diffusion.samplers import nfe, steps_for_nfe
    from patchddm_fast.sampling.segment import segment_volume
    from patchddm_fast.eval.uncertainty import uncertainty_metrics
    from patchddm_fast.model.method import get_method

    model, diffusion, cfg = load_for_inference(args.model, device=args.device)
    config = TrainConfig.from_dict(cfg)
    if args.cases is not None:
        config.phantom_val = args.cases
    multiple = get_method(config.method).size_multiple(model.size_multiple)
    _, cases = load_cases(config, multiple)
    volumes = [(c.case_id, *read_whole(c)) for c in cases]
    ens_sizes = sorted(set(args.ensembles))
    wide = None if args.ensemble_settings is None else set(args.ensemble_settings) | {args.reference}
    runs: List[Dict[str, Any]] = []
    for sampler in args.samplers:
        done_steps = set()
        for budget in sorted(set(args.nfe)):
            steps = steps_for_nfe(sampler, budget)
            members = max(ens_sizes) if (wide is None or (sampler, budget) in wide) else args.nfe_ensemble
            sizes = [k for k in ens_sizes if k <= members]
            key = (steps, members)
            if key in done_steps:  # Heun: NFE 2 is the 1-step run again
                prev = next(r for r in runs if r["sampler"] == sampler and r["steps"] == steps
                            and r["members"] == members)
                runs.append(dict(prev, nfe_budget=budget))
                continue
            done_steps.add(key)
            per_case, seconds = [], 0.0
            for cid, image, label in volumes:
                t0 = time.perf_counter()
                res = segment_volume(model, diffusion, image, method=config.method, ensemble=members, steps=steps,
                                     seed=args.seed, threshold=args.threshold, progress=False, keep_samples=True,
                                     sampler=sampler, member_batch=1)
                seconds += time.perf_counter() - t0
                gt = label.numpy().astype(bool)
                rec: Dict[str, Any] = dict(case=cid, dice={})
                for k in sizes:
                    mean = res.samples[:k].mean(0)
                    rec["dice"][str(k)] = dice((mean > args.threshold).numpy(), gt)
                    if k == max(sizes) and k > 1:
                        var = res.samples[:k].var(0, unbiased=False)
                        u = uncertainty_metrics(mean.numpy(), var.numpy(), gt, threshold=args.threshold)
                        rec.update(ensemble_for_uncertainty=k, auroc_var_error=u["auroc_var_error"],
                                   ece=u["reliability"]["ece"], reliability=u["reliability"])
                per_case.append(rec)
            mean_dice = {str(k): float(np.mean([r["dice"][str(k)] for r in per_case])) for k in sizes}
            aurocs = [r["auroc_var_error"] for r in per_case if r.get("auroc_var_error") is not None]
            runs.append(dict(sampler=sampler, nfe_budget=budget, nfe=nfe(sampler, steps), steps=steps, members=members,
                             dice=mean_dice, auroc_var_error=float(np.mean(aurocs)) if aurocs else None,
                             seconds_per_case=round(seconds / len(volumes), 2), cases=per_case))
            print(f"{sampler:8s} NFE {nfe(sampler, steps):2d} (budget {budget:2d}): Dice " +
                  ", ".join(f"{k}: {v:.4f}" for k, v in mean_dice.items()) +
                  f"  [{seconds / len(volumes):.0f} s/case]", flush=True)
    timing = batched_timing(args, model, diffusion, config, volumes) if args.timing_steps > 0 else None
    return dict(model=str(args.model), method=config.method, prediction=diffusion.prediction,
                cases=[v[0] for v in volumes], seed=args.seed, threshold=args.threshold,
                reference=dict(sampler=args.reference[0], nfe=args.reference[1]), runs=runs, timing=timing,
                machine=dict(platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(),
                             omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                             load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def batched_timing(args, model, diffusion, config, volumes) -> Dict[str, Any]:
    """Wall time of one case's ensemble sampled one member at a time vs all members as one batch."""
    import torch

    from patchddm_fast.sampling.segment import segment_volume

    cid, image, _ = volumes[0]
    out: Dict[str, Any] = dict(case=cid, sampler="ddim", steps=args.timing_steps, ensemble=args.timing_ensemble)
    results = {}
    for name, batch in (("one_at_a_time", 1), ("batched", args.timing_ensemble)):
        t0 = time.perf_counter()
        results[name] = segment_volume(model, diffusion, image, method=config.method, ensemble=args.timing_ensemble,
                                       steps=args.timing_steps, seed=args.seed, progress=False, keep_samples=True,
                                       member_batch=batch)
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    out["speedup"] = round(out["one_at_a_time_s"] / out["batched_s"], 3)
    out["max_abs_sample_difference"] = float((results["batched"].samples - results["one_at_a_time"].samples)
                                             .abs().max())
    out["masks_identical"] = bool(torch.equal(results["batched"].mask, results["one_at_a_time"].mask))
    print(f"timing ({cid}, DDIM {args.timing_steps} steps, ensemble {args.timing_ensemble}): one at a time "
          f"{out['one_at_a_time_s']} s, batched {out['batched_s']} s", flush=True)
    return out


def find(runs, sampler: str, budget: int):
    return next((r for r in runs if r["sampler"] == sampler and r["nfe_budget"] == budget), None)


def markdown(result: Dict[str, Any]) -> str:
    runs = result["runs"]
    sizes = sorted({int(k) for r in runs for k in r["dice"]})
    ref_s, ref_n = result["reference"]["sampler"], result["reference"]["nfe"]
    ref = find(runs, ref_s, ref_n)
    lines = [f"# Dice vs NFE and ensemble size ({result['date']})", "",
             f"Model `{result['model']}` ({result['method']}, {result['prediction']}-prediction), held-out cases "
             f"{', '.join(result['cases'])}, seed {result['seed']}, threshold {result['threshold']}. "
             "Dice is the mean over cases of the Dice of (mean of the first k members > threshold); "
             "the first k members of a run are exactly the k-member ensemble.", "",
             "| sampler | NFE budget | NFE spent | steps | " + " | ".join(f"Dice k={k}" for k in sizes) +
             " | AUROC var (largest k) | s/case |",
             "|---|---|---|---|" + "---|" * len(sizes) + "---|---|"]
    for r in runs:
        cells = [f"{r['dice'][str(k)]:.4f}" if str(k) in r["dice"] else "" for k in sizes]
        au = "" if r["auroc_var_error"] is None else f"{r['auroc_var_error']:.3f}"
        lines.append(f"| {r['sampler']} | {r['nfe_budget']} | {r['nfe']} | {r['steps']} | " + " | ".join(cells) +
                     f" | {au} | {r['seconds_per_case']} |")
    if ref is not None:
        lines += ["", f"Reference: {ref_s} at {ref_n} NFE. Best setting at <= 4 NFE per ensemble size "
                  "(difference to the reference at the same ensemble size):", ""]
        for k in sizes:
            if str(k) not in ref["dice"]:
                continue
            cands = [r for r in runs if r["nfe"] <= 4 and str(k) in r["dice"]]
            if not cands:
                continue
            best = max(cands, key=lambda r: r["dice"][str(k)])
            diff = best["dice"][str(k)] - ref["dice"][str(k)]
            verdict = "within 0.01 or better" if diff >= -0.01 else "NOT within 0.01"
            lines.append(f"- k={k}: {best['sampler']} at {best['nfe']} NFE: {best['dice'][str(k)]:.4f} vs "
                         f"{ref['dice'][str(k)]:.4f} ({diff:+.4f}, {verdict})")
    t = result.get("timing")
    if t:
        lines += ["", f"Batched ensemble ({t['case']}, DDIM {t['steps']} steps, {t['ensemble']} members): one member "
                  f"at a time {t['one_at_a_time_s']} s, all members in one batch {t['batched_s']} s "
                  f"(speed-up {t['speedup']}x); largest difference between the two runs' samples "
                  f"{t['max_abs_sample_difference']:.2e}, masks identical: {t['masks_identical']}."]
    m = result["machine"]
    lines += ["", f"Machine: {m['platform']}, torch {m['torch']}, {m['threads']} thread(s), load average "
              f"{m['load_average']} (wall times are only comparable within one run)."]
    return "\n".join(lines) + "\n"


def plot(result: Dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = result["runs"]
    fig = Figure(figsize=(10, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_n, ax_e = fig.subplots(1, 2)
    colours = dict(ddim="tab:blue", dpmpp2m="tab:orange", heun="tab:green")
    sizes = sorted({int(k) for r in runs for k in r["dice"]})
    for sampler in dict.fromkeys(r["sampler"] for r in runs):
        rs = sorted({r["nfe"]: r for r in runs if r["sampler"] == sampler}.values(), key=lambda r: r["nfe"])
        for k, style in ((1, "--"), (max(int(x) for r in rs for x in r["dice"]), "-")):
            pts = [(r["nfe"], r["dice"][str(k)]) for r in rs if str(k) in r["dice"]]
            if pts:
                ax_n.plot(*zip(*pts), style, marker="o", color=colours.get(sampler), label=f"{sampler}, k={k}")
        for r in rs:
            if len(r["dice"]) > 1 and max(int(x) for x in r["dice"]) == max(sizes):
                pts = [(int(k), v) for k, v in sorted(r["dice"].items(), key=lambda kv: int(kv[0]))]
                ax_e.plot(*zip(*pts), marker="o", color=colours.get(sampler), alpha=0.4 + 0.6 * (r["nfe"] >= 8),
                          label=f"{sampler}, {r['nfe']} NFE")
    ax_n.set_xscale("log", base=2)
    ax_n.set_xlabel("network evaluations per sample (NFE)")
    ax_n.set_ylabel("mean Dice")
    ax_n.set_title("Dice vs NFE (k = ensemble size)")
    ax_n.grid(alpha=0.3)
    ax_n.legend(fontsize=7)
    ax_e.set_xlabel("ensemble size k")
    ax_e.set_ylabel("mean Dice")
    ax_e.set_title("Dice vs ensemble size")
    ax_e.grid(alpha=0.3)
    if ax_e.get_legend_handles_labels()[0]:
        ax_e.legend(fontsize=7)
    fig.suptitle(f"{result['method']} on held-out phantoms ({len(result['cases'])} cases)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def merge(folders: Sequence[str]) -> Dict[str, Any]:
    """One result from partial runs; they must agree on model, cases, seed, threshold and reference."""
    parts = [json.loads((Path(f) / "nfe_sweep.json").read_text()) for f in folders]
    keys = ("model", "method", "prediction", "cases", "seed", "threshold", "reference")
    for f, part in zip(folders, parts[1:]):
        for k in keys:
            if part[k] != parts[0][k]:
                raise SystemExit(f"{f}/nfe_sweep.json: {k} {part[k]!r} differs from {folders[0]}'s {parts[0][k]!r}")
    out = dict(parts[0])
    # A setting run by several parts (e.g. once with 1 member, once with 10) keeps the run with most
    # members: its first members are the smaller run's (same seed), so nothing is lost.
    best: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for r in (r for part in parts for r in part["runs"]):
        key = (r["sampler"], r["nfe_budget"])
        if key not in best or r["members"] > best[key]["members"]:
            best[key] = r
    from patchddm_fast.diffusion.samplers import SAMPLERS

    out["runs"] = sorted(best.values(), key=lambda r: (SAMPLERS.index(r["sampler"]), r["nfe_budget"]))
    out["timing"] = next((p["timing"] for p in parts if p.get("timing")), None)
    out["command"] = " && ".join(p["command"] for p in parts)
    out["merged_from"] = [str(f) for f in folders]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        result = merge(args.merge)
    else:
        if not args.model:
            raise SystemExit("nfe_sweep.py: --model CKPT is required (or --merge DIR...)")
        result = sweep(args)
        result["command"] = "python benchmarks/nfe_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "nfe_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "nfe_sweep.md").write_text(markdown(result))
    plot(result, out / "nfe_sweep.png")
    ref = find(result["runs"], result["reference"]["sampler"], result["reference"]["nfe"])
    if ref is not None and all("reliability" in c for c in ref["cases"]):
        from patchddm_fast.eval.figures import uncertainty_figure

        uncertainty_figure(ref["cases"], out / "uncertainty.png",
                           title=f"{ref['sampler']} {ref['nfe']} NFE, ensemble {ref['cases'][0]['ensemble_for_uncertainty']}:"
                                 " variance vs errors, calibration of the mean")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
