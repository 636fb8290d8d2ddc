"""Rendering: the markdown tables, the JSON file and the scaling plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .suite import ADD_ONE_ROW, ALL_CAMS_ROW, DEFAULT_VIEW_ROW, PROMISE_RATIO, VIEW_RATIO

PROMISE_MODELS = ("resnet50",)
VIEW_MODELS = ("resnet50", "densenet121")  # where the default view's promise is stated
BACKPROP_RULES = ("gradient", "deconvnet", "guided_backprop")
BACKPROP_RATIO = 1.1  # each at most this many times a forward + backward to the input
# Score-CAM against the fastest peer, batch 1, layer4 at 224×224: a target where one is stated (on the
# CPU the masked forwards are the whole cost and the best exact forward is ~0.5× the peers', so the
# ceiling is ≈ 2×; resnet50's ratio is reported), always with maps that agree at ρ ≥ SCORECAM_RHO.
SCORECAM_MODELS = ("resnet18", "resnet50")
SCORECAM_SPEEDUP = {("resnet18", "cpu"): 1.3}
SCORECAM_RHO = 0.999


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def fmt_x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def fmt_rho(rho: float | None) -> str:
    return "–" if rho is None else f"{rho:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _mark(row: dict) -> str:
    if row.get("status") == "skipped" and row.get("per_image_s") is None:
        return " (not run)"  # e.g. past the run's deadline: nothing measured, nothing estimated
    return {"estimated": " (est.)", "skipped": " (est.)", "error": ""}.get(row.get("status"), "")


def _mem(row: dict) -> str:
    mem = row.get("memory") or {}
    parts = []
    if mem.get("rss_delta_mib") is not None:
        parts.append(f"{mem['rss_delta_mib']:.0f}")
    if mem.get("cuda_peak_mib") is not None:
        parts.append(f"cuda {mem['cuda_peak_mib']:.0f}")
    return " / ".join(parts) or "–"


def method_table(run: dict) -> list[str]:
    """One line per method, the batch sizes side by side."""
    batches = list(run["references"])
    header = ["method", "family"]
    for b in batches:
        header += [f"ms/img b={b}", "× fwd", "× fwd+bwd"]
    header += [f"peak ΔRSS MiB b={batches[-1]}", "ρ paper"]
    by_method: dict[str, dict[str, dict]] = {}
    for row in run["rows"] + run["all_cams"]:
        by_method.setdefault(row["method"], {})[str(row["batch"])] = row
    ref_row = ["**forward (reference)**", ""]
    for b in batches:
        ref = run["references"][b]
        ref_row += [fmt_ms(ref["forward"]["per_image_s"]), "1.00×", fmt_x(1 / ref["fwd_bwd_over_fwd"])]
    body = [ref_row + [_mem(run["references"][batches[-1]]["forward"]), ""]]
    both_row = ["**forward + backward to input (reference)**", ""]
    for b in batches:
        ref = run["references"][b]
        both_row += [fmt_ms(ref["forward_backward"]["per_image_s"]), fmt_x(ref["fwd_bwd_over_fwd"]), "1.00×"]
    body.append(both_row + [_mem(run["references"][batches[-1]]["forward_backward"]), ""])
    for method, per_batch in by_method.items():
        first = next(iter(per_batch.values()))
        name = f"**{method}**" if method == ALL_CAMS_ROW else method
        if first.get("options"):
            name += " (" + ", ".join(f"{k}={v}" for k, v in first["options"].items()) + ")"
        cells = [name, first.get("family", "")]
        for b in batches:
            row = per_batch.get(b)
            if row is None or row["status"] == "error":
                cells += ["error" if row else "–", "", ""]
                continue
            cells += [fmt_ms(row.get("per_image_s")) + _mark(row), fmt_x(row.get("x_forward")),
                      fmt_x(row.get("x_fwd_bwd"))]
        last = per_batch.get(batches[-1], first)
        cells += [_mem(last), fmt_rho(first.get("rho_paper"))]
        body.append(cells)
    return _table(header, body)


def peer_table(run: dict, footnotes: dict[str, int]) -> list[str]:
    header = ["method", "library", "their class", "batch", "their ms/img", "ours ms/img (paired)",
              "theirs/ours", "ρ theirs vs ours", "ρ paper: theirs / ours", "notes"]
    ours = {(r["method"], str(r["batch"])): r for r in run["rows"]}
    body = []
    for row in run["peers"]:
        mine = ours.get((row["method"], str(row["batch"])), {})
        note = ""
        if row.get("note"):
            footnotes.setdefault(row["note"], len(footnotes) + 1)
            note = f"[{footnotes[row['note']]}]"
        ours_ms = fmt_ms(row.get("ours_paired_per_image_s"))
        theirs_ms = fmt_ms(row.get("per_image_s"))
        if row["status"] == "skipped" and row.get("per_image_s") is not None:
            theirs_ms += " (pred.)"
        if row["status"] != "ok":
            note = (note + " " + row["status"] + ": " + row.get("message", "")).strip()
            ours_ms = fmt_ms(mine.get("per_image_s")) + _mark(mine)
        paper = "–"
        if row.get("rho_paper") is not None or mine.get("rho_paper") is not None:
            paper = f"{fmt_rho(row.get('rho_paper'))} / {fmt_rho(mine.get('rho_paper'))}"
        body.append([
            row["method"], row["library"], row["peer"], str(row["batch"]), theirs_ms,
            ours_ms, fmt_x(row.get("x_ours")) + _spread(row),
            fmt_rho(row.get("rho_ours")), paper, note.replace("|", "/"),
        ])
    return _table(header, body)


def view_lines(run: dict) -> list[str]:
    """The dashboard's default view (one call) with its passes, and adding one CAM to it from the cache."""
    lines = []
    for row in run.get("views", []):
        head = f"- **{row['method']}** b={row['batch']}: "
        if row["status"] != "ok":
            lines.append(head + f"{row['status']}: {row.get('message', '')}")
            continue
        text = f"{fmt_ms(row['per_image_s'])} ms/img, {fmt_x(row['x_forward'])} forward"
        if row["method"] == DEFAULT_VIEW_ROW:
            text += f" ({', '.join(row['methods'])})"
            if row.get("left_out"):
                text += "; left out: " + "; ".join(f"{m}: {why}" for m, why in row["left_out"].items())
            if row.get("pass_timings"):
                timings = row["pass_timings"].items()
                text += "; passes: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings)
        elif row["method"] == ADD_ONE_ROW:
            passes = ", ".join(row.get("passes_run") or {}) or "none"
            text += (f" (added {row['added']}; served from the cache: {len(row['reused'])} methods; "
                     f"passes run: {passes})")
        lines.append(head + text)
    return ["", "The dashboard's default view:", ""] + lines if lines else []


def promise_lines(results: dict) -> list[str]:
    lines = []
    for check in results.get("promises", []):
        verdict = "reported (no target)" if check["met"] is None else "met" if check["met"] else "MISSED"
        lines.append(f"- {check['what']}: {check['measured']} (target {check['target_text']}): **{verdict}**")
    return lines


def _promise_runs(results: dict, models=PROMISE_MODELS):
    """The runs where the promises are stated: ``models`` at 224×224."""
    for run in results["runs"]:
        if run["model"] in models and list(run.get("input", [])) == [3, 224, 224]:
            yield run


def evaluate_promises(results: dict) -> list[dict]:
    """The promises, at 224×224 (where they are stated): on resnet50 the six CAMs in one call against
    one forward pass and each backprop method against forward + backward to the input; Score-CAM at
    batch 1 against the fastest peer measured in the same run (resnet18 on the CPU: ≥ 1.3×; resnet50
    and CUDA: reported), at a map correlation of 0.999."""
    checks = []
    for run in _promise_runs(results):
        where = f"{run['model']} {'×'.join(map(str, run['input']))}"
        for row in run["all_cams"]:
            if row.get("x_forward") is None:
                continue
            checks.append({
                "what": f"{ALL_CAMS_ROW}, {where} batch {row['batch']} on {run['device']}",
                "model": run["model"], "device": run["device"], "batch": row["batch"],
                "ratio": row["x_forward"], "target": PROMISE_RATIO, "met": row["x_forward"] <= PROMISE_RATIO,
                "measured": f"{row['x_forward']:.2f}× forward", "target_text": f"≤ {PROMISE_RATIO:.1f}×",
            })
        for row in run.get("rows", []):
            if row["method"] not in BACKPROP_RULES or row.get("status") != "ok":
                continue
            ratio = row["x_fwd_bwd"]
            checks.append({
                "what": f"{row['method']}, {where} batch {row['batch']} on {run['device']}",
                "model": run["model"], "device": run["device"], "batch": row["batch"],
                "ratio": ratio, "target": BACKPROP_RATIO, "met": ratio <= BACKPROP_RATIO,
                "measured": f"{ratio:.2f}× forward + backward to the input",
                "target_text": f"≤ {BACKPROP_RATIO:.1f}×",
            })
    for run in _promise_runs(results, VIEW_MODELS):
        where = f"{run['model']} {'×'.join(map(str, run['input']))}"
        for row in run.get("views", []):
            if row["method"] != DEFAULT_VIEW_ROW or row.get("x_forward") is None or row["status"] != "ok":
                continue
            left = f" (without {', '.join(row['left_out'])}: not applicable)" if row.get("left_out") else ""
            checks.append({
                "what": f"{DEFAULT_VIEW_ROW}{left}, {where} batch {row['batch']} on {run['device']}",
                "model": run["model"], "device": run["device"], "batch": row["batch"],
                "ratio": row["x_forward"], "target": VIEW_RATIO, "met": row["x_forward"] <= VIEW_RATIO,
                "measured": f"{row['x_forward']:.2f}× forward", "target_text": f"≤ {VIEW_RATIO:.1f}×",
            })
    for run in _promise_runs(results, SCORECAM_MODELS):
        checks += _scorecam_promise(run, f"{run['model']} {'×'.join(map(str, run['input']))}")
    return checks


def _scorecam_promise(run: dict, where: str) -> list[dict]:
    """Speed against the fastest peer; agreement with every peer that defines Score-CAM as our default
    does (a peer with another upsampling convention is reported, not held against the promise). With
    several head-to-head pairs, the measured range of the ratio is given too."""
    peers = [p for p in run.get("peers", [])
             if p["method"] == "scorecam" and p["batch"] == 1 and p["status"] == "ok"]
    if not peers:
        return []
    fastest = min(peers, key=lambda p: p["per_image_s"])
    same = [p.get("rho_ours") for p in peers if not p.get("differs")]
    agree = bool(same) and all(r is not None and r >= SCORECAM_RHO for r in same)
    speedup = fastest["x_ours"]
    rhos = ", ".join(f"{p['library']} " + ("–" if p.get("rho_ours") is None else f"{p['rho_ours']:.4f}")
                     + (f" ({p['differs']})" if p.get("differs") else "") for p in peers)
    target = SCORECAM_SPEEDUP.get((run["model"], run["device"]))
    ours_s = fastest.get("ours_paired_per_image_s")
    return [{
        "what": f"scorecam, {where} batch 1 on {run['device']}, against the fastest peer "
                f"({fastest['library']}, {fastest['per_image_s']:.1f} s"
                + (f"; ours {ours_s:.1f} s" if ours_s is not None else "") + ")",
        "model": run["model"], "device": run["device"], "batch": 1,
        "ratio": speedup, "target": target, "met": None if target is None else speedup >= target and agree,
        "measured": f"{speedup:.2f}× faster{_spread(fastest)}; ρ with {rhos}",
        "target_text": "none, reported" if target is None else f"≥ {target:g}× faster at ρ ≥ {SCORECAM_RHO}",
    }]


def _spread(row: dict) -> str:
    """`` (1.28–1.41× over 3 pairs)`` for a head-to-head row with several pairs, else ``""``."""
    runs = row.get("x_ours_runs") or []
    if len(runs) < 2:
        return ""
    return f" ({min(runs):.2f}–{max(runs):.2f}× over {len(runs)} pairs)"


def row_notes(results: dict) -> list[str]:
    """What our long methods did: channels evaluated and skipped, which forward path ran and why."""
    lines = []
    for run in results["runs"]:
        for row in run["rows"]:
            extras = row.get("extras") or {}
            if not extras:
                continue
            parts = []
            if "channels" in extras and "channels_skipped" in extras:
                parts.append(f"{extras['channels_skipped']} of {extras['channels']} channels skipped exactly")
            if "forwards" in extras:
                parts.append(f"{extras['forwards']} forwards")
            if extras.get("approximate"):
                parts.append("APPROXIMATE")
            if "forward" in extras:
                why = f" ({extras['forward_why']})" if extras.get("forward_why") else ""
                parts.append(f"forward: {extras['forward']}{why}")
            if "path" in extras:
                parts.append(f"path: {extras['path']}")
            if extras.get("out_of_memory"):
                parts.append(extras["out_of_memory"])
            if "agreement_with" in extras:
                r = extras.get("agreement_r")
                parts.append(f"against {extras['agreement_with']} (fp32): r = {fmt_rho(r)}, largest "
                             f"difference of the normalised maps {extras['agreement_max_abs_diff']:.4f}")
            if parts:
                lines.append(f"- {run['model']} {row['method']} b={row['batch']}: " + "; ".join(parts))
    return lines


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# vislib benchmark ({meta['started']})", ""]
    out += [f"- {k}: {v}" for k, v in meta.items() if k != "started"]
    out += ["", "Times are medians of several runs after a warm-up, per image (ms/img), at the same batch "
            "size as the references measured in the same run. Every row is timed *paired*, so that its "
            "ratio sees the same machine load: our rows alternately with a forward pass (× fwd is the "
            "median of the per-pair ratios; × fwd+bwd divides it by the references' own paired ratio), "
            "the peers alternately with our method. `(est.)`: the method was stopped when its projected "
            "time exceeded the row budget (estimate from its progress reports; ratios to the references). "
            "`(pred.)`: a peer predicted (its passes × the reference time) to exceed the budget was not "
            "run. Peak ΔRSS: rise of the process's resident-set high-water mark during the row."]
    footnotes: dict[str, int] = {}
    for run in results["runs"]:
        out += ["", f"## {run['model']} on {run['device']}: input {'×'.join(map(str, run['input']))}, "
                f"layer `{run['layer']}`, weights {run['weights']}", ""]
        scale = next(iter(run.get("layer_gradient", {}).values()), None)
        if scale:
            out += [f"Median |∂S/∂A| at `{run['layer']}`: {scale['median_abs_gradient']:.2e}; an absolute "
                    f"eps = {scale['eps']:g} exceeds the Grad-CAM++ denominator at "
                    f"{100 * scale['eps_dominates_share']:.0f}% of the positive-gradient positions.", ""]
        if not run["references"]:
            out += ["Nothing measured: the run's deadline had passed."]
            continue
        out += method_table(run)
        out += view_lines(run)
        if run["peers"]:
            out += ["", f"### {run['model']}: side by side with the peer libraries", ""]
            out += peer_table(run, footnotes)
    for skipped in results.get("skipped", []):
        out += ["", f"- skipped: {skipped}"]
    if results.get("agreement_cam"):
        from .agreement_cam import render_markdown as agreement_markdown

        out += ["", "## CAM-family agreement with the peers (benchmarks.agreement_cam)", "",
                agreement_markdown(results["agreement_cam"])]
    out += ["", "## Promises", ""]
    missing = "- not measured here (the promises are stated for resnet50 at 224×224)"
    out += promise_lines(results) or [missing]
    if results.get("agreement_backprop"):
        from .agreement_backprop import render

        out += [""] + render(results["agreement_backprop"])
    notes = row_notes(results)
    if notes:
        out += ["", "## What the long methods did", ""] + notes
    if footnotes:
        out += ["", "## Notes on the peers", ""]
        out += [f"{n}. {text}" for text, n in sorted(footnotes.items(), key=lambda kv: kv[1])]
    return "\n".join(out) + "\n"


def scaling_figure(scaling: dict):
    """A plotly figure: per-image time (top) and the six CAMs / forward ratio (bottom, with the 1.3×
    promise) against batch size (left) and input size (right)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.65, 0.35],
                        subplot_titles=("against batch size", "against input size (batch 1)", "", ""))
    for col, axis in ((1, "batch"), (2, "size")):
        points = scaling["points"][axis]
        xs = [p[axis] for p in points]
        for series, label, color in (("forward_per_image_s", "forward pass", "#888"),
                                     ("cams_per_image_s", "six CAMs, one call", "#d62728")):
            fig.add_trace(go.Scatter(
                x=xs, y=[p[series] * 1000 for p in points], mode="lines+markers", name=label,
                line={"color": color}, showlegend=col == 1, legendgroup=label,
                hovertemplate="%{y:.1f} ms/img<extra>" + label + "</extra>",
            ), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=xs, y=[p["x_forward"] for p in points], mode="lines+markers", name="six CAMs / forward",
            line={"color": "#1f77b4"}, showlegend=col == 1, legendgroup="ratio",
            hovertemplate="%{y:.2f}× forward<extra></extra>",
        ), row=2, col=col)
        fig.add_hline(y=PROMISE_RATIO, line_dash="dash", line_color="#2ca02c", row=2, col=col)
    batches = [p["batch"] for p in scaling["points"]["batch"]]
    fig.update_xaxes(type="log", tickvals=batches, row=1, col=1)
    fig.update_xaxes(title_text="batch size", type="log", tickvals=batches, row=2, col=1)
    fig.update_xaxes(title_text="input side (px)", row=2, col=2)
    fig.update_yaxes(title_text="ms per image", row=1, col=1)
    ratios = [p["x_forward"] for axis in ("batch", "size") for p in scaling["points"][axis]]
    top = max([PROMISE_RATIO * 1.2, *(1.1 * r for r in ratios)])
    fig.update_yaxes(title_text="× forward", range=[0, top], row=2, col=1)
    fig.update_yaxes(range=[0, top], row=2, col=2)
    fig.update_layout(title=f"CAM engine scaling: {scaling['model']} on {scaling['device']} "
                            f"(dashed: the {PROMISE_RATIO}× promise)", height=650)
    return fig


def write_results(results: dict, out_dir: Path) -> list[Path]:
    """results.md, results.json and, with scaling data, scaling.html/.json (and .png with kaleido)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    md = out_dir / "results.md"
    md.write_text(render_markdown(results))
    written.append(md)
    js = out_dir / "results.json"
    js.write_text(json.dumps(results, indent=1, default=_jsonable))
    written.append(js)
    for i, scale in enumerate(results.get("scaling", [])):
        stem = "scaling" if i == 0 else f"scaling-{i}"
        (out_dir / f"{stem}.json").write_text(json.dumps(scale, indent=1, default=_jsonable))
        fig = scaling_figure(scale)
        fig.write_html(out_dir / f"{stem}.html", include_plotlyjs=True, full_html=True)
        written += [out_dir / f"{stem}.json", out_dir / f"{stem}.html"]
        try:
            import kaleido  # noqa: F401

            fig.write_image(out_dir / f"{stem}.png")
            written.append(out_dir / f"{stem}.png")
        except Exception:  # PNG is optional: kaleido (and a browser for it) may be missing
            pass
    return written


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
