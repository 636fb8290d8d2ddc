"""Smoke and unit tests of the benchmark (benchmarks/): structure and arithmetic, never timing thresholds.

A tiny analytic-size CNN at 32×32 keeps the whole file to a few seconds; the peers are exercised only
when they are installed (requirements-bench.txt).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

import vislib
from benchmarks import measure, report, suite
from benchmarks.measure import agreement, pearson, time_call, time_paired
from benchmarks.reference import paper_maps
from benchmarks.suite import ALL_CAMS_ROW, BenchConfig, BudgetGuard, bench_bundle
from vislib.models import Preprocess

SIDE = 32
FAST_METHODS = ["cam", "gradcam", "gradcam++", "hirescam", "gradient", "guided_backprop", "eigencam"]


class TinyNet(nn.Module):
    """conv → ReLU → conv → ReLU (the target layer) → global average pool → linear."""

    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def bundle():
    return vislib.load_model(TinyNet(), preprocess=Preprocess(resize=SIDE, crop=SIDE), default_layer="features.4",
                             device="cpu", name="tiny")


@pytest.fixture(scope="module")
def result(bundle):
    methods = [m for m in FAST_METHODS if m in vislib.METHODS]
    config = BenchConfig(batches=(1, 2), repeats=2, warmup=1, methods=methods, peers=False)
    return bench_bundle(bundle, config)


# --------------------------------------------------------------------------------------------------
# The core loop


def test_every_requested_method_has_a_row_per_batch(result):
    methods = [m for m in FAST_METHODS if m in vislib.METHODS]
    assert {(r["method"], r["batch"]) for r in result["rows"]} == {(m, b) for m in methods for b in (1, 2)}
    assert all(r["status"] == "ok" for r in result["rows"]), [r for r in result["rows"] if r["status"] != "ok"]
    assert [r["batch"] for r in result["all_cams"]] == [1, 2]
    assert result["input"] == [3, SIDE, SIDE]
    assert set(result["references"]) == {"1", "2"}


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def test_references_are_paired_with_each_other(result):
    for refs in result["references"].values():
        fwd, both = refs["forward"]["runs"], refs["forward_backward"]["runs"]
        assert len(fwd) == len(both) == 2
        assert refs["fwd_bwd_over_fwd"] == pytest.approx(_median([b / a for a, b in zip(fwd, both, strict=True)]))
        assert refs["forward"]["per_image_s"] == pytest.approx(_median(fwd) / refs["forward"]["batch"])


def test_ratios_use_the_forward_passes_timed_with_the_row(result):
    """× fwd: median of (method / forward) over pairs; × fwd+bwd: that over the references' ratio."""
    for row in result["rows"] + result["all_cams"]:
        refs = result["references"][str(row["batch"])]
        pairs = list(zip(row["paired_forward_runs_s"], row["runs_s"], strict=True))
        assert len(pairs) == 2 and row["warmup"] == 1
        assert row["x_forward"] == pytest.approx(_median([m / f for f, m in pairs]))
        assert row["x_fwd_bwd"] == pytest.approx(row["x_forward"] / refs["fwd_bwd_over_fwd"])
        assert row["per_image_s"] == row["median_s"] / row["batch"]
        paired_forward = _median(row["paired_forward_runs_s"]) / row["batch"]
        assert row["paired_forward_per_image_s"] == pytest.approx(paired_forward)


def test_all_cams_row_is_one_call_with_the_six_cams(result):
    for row in result["all_cams"]:
        assert row["method"] == ALL_CAMS_ROW and row["status"] == "ok"
        assert row["methods"] == [m for m in suite.SIX_CAMS if m in vislib.METHODS]


def test_our_maps_agree_with_the_textbook_formulas(result):
    """ρ against independent float64 formulas (CAMs) and plain autograd (gradient)."""
    for row in result["rows"]:
        if row["method"] in ("cam", "gradcam", "gradcam++", "hirescam", "gradient"):
            assert row["rho_paper"] == pytest.approx(1.0, abs=1e-4), row["method"]


def test_memory_is_measured_per_row(result):
    for row in result["rows"]:
        mem = row["memory"]
        assert mem["peak_rss_mib"] > 0 and mem["rss_delta_mib"] >= 0
        assert mem["cuda_peak_mib"] is None


def test_markdown_and_json_outputs(result, tmp_path):
    results = {"meta": {"started": "now", "torch": torch.__version__}, "runs": [result], "skipped": ["x: why"]}
    results["promises"] = report.evaluate_promises(results)
    assert results["promises"] == []  # the promise is stated for resnet50 at 224×224 only
    written = report.write_results(results, tmp_path)
    assert {p.name for p in written} == {"results.md", "results.json"}
    text = (tmp_path / "results.md").read_text()
    header = "| method | family | ms/img b=1 | × fwd | × fwd+bwd | ms/img b=2 | × fwd | × fwd+bwd |"
    assert header in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    for method in [r["method"] for r in result["rows"]] + ["**forward (reference)**", f"**{ALL_CAMS_ROW}**"]:
        assert any(line.startswith(f"| {method} |") for line in lines), method
    assert "- skipped: x: why" in text and "## Promises" in text
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["runs"][0]["rows"][0]["x_forward"] == result["rows"][0]["x_forward"]


def test_promise_verdict_is_the_paired_ratio_against_the_target():
    run = {"model": "resnet50", "device": "cpu", "input": [3, 224, 224], "all_cams": [
        {"batch": 1, "x_forward": 1.2}, {"batch": 16, "x_forward": 1.31}]}
    checks = report.evaluate_promises({"runs": [run]})
    assert [(c["batch"], c["met"]) for c in checks] == [(1, True), (16, False)]
    assert all(c["target"] == suite.PROMISE_RATIO == 1.3 for c in checks)


def test_backprop_and_scorecam_promises():
    """Backprop rows against 1.1× forward + backward; Score-CAM against the *fastest* peer: ≥ 1.3× on
    resnet18 on the CPU, and only when every peer's map agrees with ours at ρ ≥ 0.999; resnet50's ratio
    is reported without a target."""
    rows = [{"method": "gradient", "batch": 1, "status": "ok", "x_fwd_bwd": 1.05},
            {"method": "guided_backprop", "batch": 16, "status": "ok", "x_fwd_bwd": 1.12},
            {"method": "gradcam", "batch": 1, "status": "ok", "x_fwd_bwd": 0.5}]

    def peers():
        return [{"method": "scorecam", "batch": 1, "status": "ok", "library": "slow", "per_image_s": 14.0,
                 "x_ours": 1.5, "rho_ours": 0.9999},
                {"method": "scorecam", "batch": 1, "status": "ok", "library": "fast", "per_image_s": 12.0,
                 "x_ours": 1.35, "rho_ours": 0.9995, "x_ours_runs": [1.31, 1.35, 1.42]}]

    run50 = {"model": "resnet50", "device": "cpu", "input": [3, 224, 224], "all_cams": [], "rows": rows,
             "peers": peers()}
    run18 = {"model": "resnet18", "device": "cpu", "input": [3, 224, 224], "all_cams": [], "rows": [],
             "peers": peers()}
    checks = report.evaluate_promises({"runs": [run50, run18]})
    assert [(c["what"].split(",")[0], c["model"], c["met"]) for c in checks] == [
        ("gradient", "resnet50", True), ("guided_backprop", "resnet50", False), ("scorecam", "resnet50", None),
        ("scorecam", "resnet18", True)]
    assert checks[-1]["ratio"] == 1.35 and "fast" in checks[-1]["what"] and checks[-1]["target"] == 1.3
    assert "(1.31–1.42× over 3 pairs)" in checks[-1]["measured"]
    run18["peers"][0]["rho_ours"] = 0.99  # one peer disagrees: the promise is not met whatever the speed
    assert not report.evaluate_promises({"runs": [run18]})[-1]["met"]
    run18["peers"][0]["differs"] = "align_corners=True upsampling"  # ... unless it defines the map otherwise
    assert report.evaluate_promises({"runs": [run18]})[-1]["met"]
    run18["peers"][1]["x_ours"] = 1.2
    checks = report.evaluate_promises({"runs": [run50, run18]})
    text = "\n".join(report.promise_lines({"promises": checks}))
    assert "**MISSED**" in text and "≥ 1.3× faster at ρ ≥ 0.999" in text and "reported (no target)" in text


def test_scaling_points_and_plot(bundle, tmp_path):
    config = BenchConfig(repeats=1, warmup=0)
    data = suite.scaling(bundle, batches=[1, 2], sizes=[SIDE, 40], config=config)
    assert [p["batch"] for p in data["points"]["batch"]] == [1, 2]
    assert [p["size"] for p in data["points"]["size"]] == [SIDE, 40]
    for p in data["points"]["batch"] + data["points"]["size"]:
        assert p["x_forward"] == pytest.approx(p["cams_per_image_s"] / p["forward_per_image_s"])
    results = {"meta": {"started": "now"}, "runs": [], "scaling": [data]}
    names = {p.name for p in report.write_results(results, tmp_path)}
    assert {"scaling.html", "scaling.json"} <= names
    assert "plotly" in (tmp_path / "scaling.html").read_text()[:200_000].lower()


# --------------------------------------------------------------------------------------------------
# Measuring tools


def test_time_call_counts_warmup_and_repeats():
    calls = []
    timing, out = time_call(lambda: calls.append(1) or len(calls), device=torch.device("cpu"), batch=4,
                            repeats=3, warmup=1)
    assert len(calls) == 4 and len(timing.runs) == 3 and timing.warmup == 1 and out == 4
    assert timing.per_image == timing.median / 4


def test_time_call_budget_keeps_one_measured_call():
    calls = []
    timing, _ = time_call(lambda: calls.append(1), device=torch.device("cpu"), batch=1, repeats=5,
                          warmup=2, budget_s=0.0)
    assert len(calls) == 1 and len(timing.runs) == 1 and timing.warmup == 0 and "budget" in timing.note


def test_time_paired_alternates():
    order = []
    ref, timed, out = time_paired(lambda: order.append("f"), lambda: order.append("m") or "out",
                                  device=torch.device("cpu"), batch=1, repeats=2, warmup=1)
    assert order == ["f", "m"] * 3 and len(ref.runs) == len(timed.runs) == 2 and out == "out"


def test_budget_guard_projects_from_the_rate_after_the_first_report(monkeypatch):
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(suite.time, "perf_counter", lambda: next(clock))
    guard = BudgetGuard(budget_s=5.0)  # reset() reads t = 0
    guard(0, 100)  # t = 1: start-up cost (1 s) is not extrapolated
    guard(10, 100)  # t = 2: 0.1 s per step → 2 + 0.1·90 = 11 s
    assert guard.cancel.is_set() and guard.estimate_s == pytest.approx(11.0)


def test_pearson_by_hand():
    a = torch.tensor([[1.0, 2.0, 4.0, 7.0], [0.0, 1.0, 0.0, 1.0]])
    assert pearson(a, 3 * a + 2) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    # x = (1, 2, 3), y = (1, 3, 2): Σ dx·dy = 1, Σ dx² = Σ dy² = 2, ρ = 0.5
    assert pearson(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0]])) == pytest.approx(0.5)
    assert pearson(torch.ones(1, 4), a[:1]) is None


def test_agreement_compares_signals_raw_and_maps_at_input_size():
    signal = torch.randn(2, 3, 8, 8)
    rho, what = agreement(signal.numpy(), None, -signal, (8, 8))
    assert what == "input-space signal" and rho == pytest.approx(-1.0)
    coarse = torch.rand(2, 4, 4) - 0.5  # signed: an occlusion drop can be negative
    ours = measure.as_maps(coarse, (8, 8))
    rho, what = agreement(coarse.numpy(), ours.numpy(), 5 * coarse + 1, (8, 8))
    assert what == "map at input size" and rho == pytest.approx(1.0)
    # a peer repeating one value per pixel over the colour channels (Captum's Occlusion) keeps its sign
    rho, what = agreement(coarse.numpy(), ours.numpy(), ours.unsqueeze(1).expand(2, 3, 8, 8), (8, 8))
    assert what == "map at input size" and rho == pytest.approx(1.0)
    # different colour channels: both compared as displayed, |·| maximised over channels
    rho, what = agreement(ours.abs().numpy(), ours.abs().numpy(), signal, (8, 8))
    assert what == "displayed map at input size"
    assert rho == pytest.approx(pearson(ours.abs(), signal.abs().amax(dim=1)))


def test_reference_gradcam_times_area_is_cam_on_a_gap_linear_head(bundle):
    """GAP + linear head: g = w_c / Z everywhere, so Grad-CAM·Z = CAM (METHODS.md equivalence)."""
    x = torch.randn(2, 3, SIDE, SIDE)
    targets = torch.tensor([0, 3])
    maps, scale = paper_maps(bundle.model, "features.4", x, targets)
    z = maps["cam"].shape[-1] * maps["cam"].shape[-2]
    torch.testing.assert_close(maps["gradcam"] * z, maps["cam"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(maps["xgradcam"] * z, maps["cam"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(maps["hirescam"] * z, maps["cam"], rtol=1e-9, atol=1e-9)
    assert 0.0 <= scale["eps_dominates_share"] <= 1.0 and scale["median_abs_gradient"] > 0


def test_reference_leaves_the_model_untouched(bundle):
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    paper_maps(bundle.model, "features.4", torch.randn(1, 3, SIDE, SIDE), torch.tensor([1]))
    assert all(p.grad is None for p in bundle.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())
    assert all(not m._forward_hooks for m in bundle.model.modules())


# --------------------------------------------------------------------------------------------------
# Peers (only where installed) and the command line


@pytest.mark.skipif(not any(importlib.util.find_spec(m) for m in ("pytorch_grad_cam", "torchcam", "captum")),
                    reason="no peer library installed (requirements-bench.txt)")
def test_peers_side_by_side(bundle):
    methods = [m for m in ("gradcam", "gradcam++", "gradient") if m in vislib.METHODS]
    config = BenchConfig(batches=(2,), repeats=1, warmup=0, methods=methods)
    result = bench_bundle(bundle, config)
    ours = {r["method"]: r for r in result["rows"]}
    assert result["peers"], "installed peers must produce rows"
    for row in result["peers"]:
        assert row["status"] == "ok", row
        assert row["x_ours"] == pytest.approx(row["per_image_s"] / row["ours_paired_per_image_s"])
        assert row["method"] in ours
        assert -1.0 <= row["rho_ours"] <= 1.0 + 1e-9
    for row in result["peers"]:
        if row["method"] in ("gradcam", "gradient"):  # no known disagreement: same maps
            assert row["rho_ours"] == pytest.approx(1.0, abs=1e-4), row
    assert all(p.grad is None for p in bundle.model.parameters())  # peers ran on their own copies


def test_peer_cost_model(bundle):
    from benchmarks import peers

    x = torch.randn(2, 3, SIDE, SIDE)
    setup = peers.peer_setup(bundle.model, "features.4", x, torch.tensor([0, 1]), {"patch": 4, "stride": 2})
    assert peers._channel_passes(setup) == (8, "forward")
    assert peers._occlusion_passes(setup) == (((SIDE - 4) // 2 + 1) ** 2, "forward")  # 15 × 15 windows


def test_peer_predicted_over_budget_is_skipped_without_running(bundle):
    from benchmarks.peers import PeerMethod

    def never(_setup):
        raise AssertionError("a skipped peer must not run")

    peer = PeerMethod("lib", "Slow", "gradcam", never, passes=lambda s: (1000, "forward"))
    refs = {"forward": {"per_image_s": 0.01}, "forward_backward": {"per_image_s": 0.02}}
    x = torch.randn(2, 3, SIDE, SIDE)
    row = suite.run_peer(peer, bundle, x, torch.tensor([0, 1]), {"status": "ok"}, None, {}, refs,
                         BenchConfig(budget_s=5.0))
    assert row["status"] == "skipped" and row["per_image_s"] == pytest.approx(10.0)  # 1000 × 0.01 s


def test_command_line_writes_the_results_folder(tmp_path, capsys):
    from benchmarks.run import main

    out = tmp_path / "bench"
    code = main(["--models", "resnet18@32,no_such_model", "--size", "40", "--methods", "gradcam,hirescam",
                 "--batches", "1", "--repeats", "1", "--warmup", "0", "--no-peers", "--devices", "cpu",
                 "--scaling-model", "resnet18", "--scaling-batches", "1", "--scaling-sizes", "32",
                 "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.json", "scaling.html", "scaling.json"}
    data = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["input"]) for r in data["runs"]] == [("resnet18", [3, 32, 32])]
    assert data["runs"][0]["weights"] == "random"
    assert any("no_such_model" in s for s in data["skipped"])
    assert "| gradcam |" in capsys.readouterr().out


@pytest.mark.skipif(not (importlib.util.find_spec("captum") and importlib.util.find_spec("zennit")),
                    reason="captum / zennit not installed")
def test_backprop_agreement_rows_and_table(bundle):
    from benchmarks import agreement_backprop

    x = torch.randn(1, 3, SIDE, SIDE)
    rows = []
    for method, options in (("input_x_gradient", {}), ("lrp", {"composite": "epsilon_gamma_box"})):
        peer = next(p for p in agreement_backprop.PEERS if p.ours == method)
        row = agreement_backprop.compare(bundle, x, torch.tensor([1]), method, options, peer, repeats=1)
        assert row["status"] == "ok" and row["compared"] == "input-space signal", row
        assert -1.0 <= row["r"] <= 1.0 + 1e-9 and row["x_forward"] > 0
        rows.append({"model": "tiny", "input": [3, SIDE, SIDE], "method": method, "options": options,
                     "library": peer.library, "peer": peer.peer_name, "note": peer.note, **row})
    table = "\n".join(agreement_backprop.render({"threshold": 0.999, "rows": rows}))
    assert "| tiny | 32×32 | input_x_gradient | captum InputXGradient |" in table
    assert "lrp (composite=epsilon_gamma_box)" in table


# --------------------------------------------------------------------------------------------------
# Head to head, variants, deadline, the --gpu preset


def test_head_to_head_alternates_and_starts_ours_cold(monkeypatch):
    from vislib.methods import frozen

    order = []
    monkeypatch.setattr(frozen, "clear_cache", lambda: order.append("clear"))
    mine, theirs, out, memory = suite.head_to_head(lambda: order.append("ours"), lambda: order.append("theirs") or 7,
                                                   torch.device("cpu"), batch=1, pairs=2)
    assert order == ["clear", "ours", "theirs"] * 2
    assert len(mine.runs) == len(theirs.runs) == 2 and out == 7 and memory.peak_rss_mib is not None


def test_variant_rows_report_their_agreement_with_the_plain_method(bundle):
    """The --gpu preset's reduced-precision Score-CAM rows, on the tiny net (bf16 autocast runs on the CPU)."""
    from benchmarks.run import GPU

    config = BenchConfig(batches=(1,), repeats=1, warmup=0, methods=["scorecam"], peers=False,
                         variants=GPU["variants"])
    run = bench_bundle(bundle, config)
    rows = {r["method"]: r for r in run["rows"]}
    assert set(rows) == {"scorecam", "scorecam[bf16]", "scorecam[fp16]"}
    for label in ("scorecam[bf16]", "scorecam[fp16]"):
        extras = rows[label]["extras"]
        assert extras["precision"] == label[-5:-1] and extras["approximate"] is True
        assert extras["agreement_with"] == "scorecam" and extras["agreement_r"] > 0.99
        assert 0 <= extras["agreement_max_abs_diff"] < 0.2
    notes = "\n".join(report.row_notes({"runs": [run]}))
    assert "against scorecam (fp32): r = " in notes


def test_a_run_past_its_deadline_skips_rows_but_returns(bundle):
    import time

    config = BenchConfig(batches=(1, 2), repeats=1, warmup=0, methods=["gradcam", "eigencam"], peers=False,
                         deadline=time.perf_counter() - 1)
    run = bench_bundle(bundle, config)
    assert len(run["rows"]) == 4 and all(r["status"] == "skipped" for r in run["rows"])
    assert all("deadline" in r["message"] for r in run["rows"]) and run["all_cams"] == []
    report.render_markdown({"meta": {"started": "now"}, "runs": [run]})  # renders without timings


def test_gpu_preset_and_its_cpu_dry_run():
    from benchmarks.run import parse_args

    args = parse_args(["--gpu"])
    assert args.devices == ["cuda"] and args.batches == [1, 16, 64] and args.models == ["resnet50"]
    assert [v[0] for v in args.variants] == ["scorecam[bf16]", "scorecam[fp16]"]
    dry = parse_args(["--gpu", "--devices", "cpu", "--models", "resnet18@64", "--batches", "1,2", "--deadline", "60"])
    assert dry.devices == ["cpu"] and dry.batches == [1, 2] and dry.variants == args.variants and dry.deadline == 60
    scorecam = parse_args(["--scorecam"])
    assert scorecam.models[:2] == ["resnet18", "resnet50"] and scorecam.pairs["resnet18"] == 3
    assert parse_args(["--scorecam", "--pairs", "2"]).pairs == 2


# --------------------------------------------------------------------------------------------------
# The dashboard's default view and adding one CAM to it from the cache (issue 17's promise rows)


def test_default_view_and_add_one_cam_rows(result):
    from vislib import ui

    view, add = result["views"][:2]
    assert view["method"] == suite.DEFAULT_VIEW_ROW and view["status"] == "ok", view
    assert view["methods"] == [m for m in ui.default_methods() if m not in view.get("left_out", {})]
    assert {"guided_backprop", "deconvnet", "gradcam"} <= set(view["methods"])
    # one recorded forward for both families: no separate backprop forward
    assert "forward" in view["pass_timings"] and "backprop_forward" not in view["pass_timings"]
    assert view["x_forward"] > 0
    assert add["method"] == suite.ADD_ONE_ROW and add["status"] == "ok", add
    assert sorted(add["reused"]) == sorted(m for m in view["methods"] if m != add["added"])
    assert not any("forward" in name for name in add["passes_run"])  # served from the recorded pass
    assert len(add["runs_s"]) == len(add["paired_forward_runs_s"]) == 2


def test_the_view_promise_is_checked_where_it_is_stated(result):
    run = {**result, "model": "densenet121", "input": [3, 224, 224],
           "views": [{**result["views"][0], "left_out": {"cam": "no GAP + linear head"}, "x_forward": 4.5}]}
    checks = [c for c in report.evaluate_promises({"runs": [run]}) if c["target"] == suite.VIEW_RATIO]
    assert len(checks) == 1 and checks[0]["met"] is False and "without cam" in checks[0]["what"]
    run["views"][0]["x_forward"] = 3.9
    assert report.evaluate_promises({"runs": [run]})[-1]["met"] is True
    text = report.render_markdown({"meta": {"started": "now"}, "runs": [result]})
    assert suite.DEFAULT_VIEW_ROW in text and suite.ADD_ONE_ROW in text and "served from the cache" in text
