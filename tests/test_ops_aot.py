"""``patchddm kernels``: every Triton kernel compiles for sm_80/86/89/90 with no GPU, spill-free.

One run of the command (fp16 variants, both layouts: every kernel function appears)
is shared by the tests of this module; compiled kernels land in Triton's cache, so
reruns are fast.  The full matrix (fp32/fp16/bf16) is the command's default.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from patchddm_fast.cli import kernels as kernels_cmd
from patchddm_fast.kernels import aot
from patchddm_fast.kernels import average_skip
from patchddm_fast.kernels import fused_conv3d
from patchddm_fast.kernels import gn_silu

ARCHS = {"sm_80", "sm_86", "sm_89", "sm_90"}
KERNEL_FUNCTIONS = {
    "_gn_stats_kernel", "_gn_combine_kernel", "_gn_silu_fwd_kernel", "_gn_silu_bwd_reduce_kernel",
    "_gn_silu_bwd_finalize_kernel", "_gn_silu_bwd_dx_kernel", "_skip_combine_kernel",
    "_conv3d_fwd_kernel",
}


def _parse(argv):
    parser = argparse.ArgumentParser()
    kernels_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(["kernels", *argv])


@pytest.fixture(scope="module")
def report():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = kernels_cmd.run(_parse(["--json", "--quiet"]))  # every dtype and layout variant
    return rc, json.loads(out.getvalue())


def test_every_kernel_compiles_for_all_four_archs(report):
    rc, data = report
    rows = data["kernels"]
    assert {r["kernel"] for r in rows} == KERNEL_FUNCTIONS
    by_name = {}
    for r in rows:
        assert set(r) >= {"name", "arch", "registers", "spills", "shared_bytes"}
        by_name.setdefault(r["name"], set()).add(r["arch"])
    assert all(archs == ARCHS for archs in by_name.values())
    assert set(by_name) == {v.name for v in aot.all_variants()}
    for dt in ("fp32", "fp16", "bf16"):
        assert any(f"[{dt},cl," in n for n in by_name) and any(f"[{dt},cf," in n for n in by_name)
    conv = {n for n in by_name if "conv" in n}  # issue 9: the conv kernels' names contain "conv"
    for kind in ("k3s1", "k3s2", "k3s1_up", "k3s1_res", "k1s1"):
        assert any(f",{kind}," in n for n in conv), kind


def test_no_spills_and_plausible_resources(report):
    rc, data = report
    for r in data["kernels"]:
        assert r["spills"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert 0 <= r["shared_bytes"] <= 48 * 1024, r
    assert rc == 0


def test_human_table_lists_every_variant(report):
    _, data = report
    table = kernels_cmd.format_table(data["kernels"])
    names = {r["name"] for r in data["kernels"]}
    assert all(name in table for name in names)
    assert "0 with spills" in table.splitlines()[-1]


def test_variants_match_what_the_launchers_use():
    """The AOT tile constants are the ones make_plan picks on CUDA for the network."""
    for layout in ("cf", "cl"):
        for channels in gn_silu.NETWORK_CHANNELS:
            cpg = channels // gn_silu.NETWORK_GROUPS
            t = gn_silu.tile_config(gn_silu.NETWORK_GROUPS, cpg, layout, cuda=True)
            matching = [v for v in aot.all_variants(("fp16",), (layout,))
                        if v.kernel is gn_silu._gn_silu_fwd_kernel
                        and v.constexprs["CPG_PAD"] == t.cpg_pad]
            assert matching and all(v.constexprs["BLOCK_S"] == t.block_s
                                    and v.constexprs["G_TILE"] == t.g_tile
                                    and v.num_warps == t.num_warps for v in matching)
    assert [v.constexprs["BLOCK"] for v in average_skip.aot_variants()] == [average_skip.BLOCK_CUDA] * 3
    conv = fused_conv3d.aot_variants(("fp16",))
    assert {v.constexprs["BLOCK_N"] for v in conv} == {fused_conv3d.block_n(c) for c in fused_conv3d.NETWORK_CHANNELS}
    assert all(v.constexprs["BLOCK_M"] == fused_conv3d.BLOCK_M_CUDA and v.num_warps == fused_conv3d.NUM_WARPS_CUDA
               and v.constexprs["BLOCK_K"] == fused_conv3d.block_k(max(fused_conv3d.NETWORK_CHANNELS))
               for v in conv)
    assert all(v.constexprs["BLOCK_K"] == 16 for v in fused_conv3d.aot_variants(("fp32",)))


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        _parse(["--archs", "75"])
    with pytest.raises(SystemExit):
        _parse(["--dtypes", "fp8"])


def test_refuses_to_run_under_triton_interpret(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels_cmd.run(_parse(["--quiet"])) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err
