"""``python -m benchmarks.agreement_cam``: the newer CAM-family methods against pytorch-grad-cam.

Each case runs ``vislib.explain`` and the peer on the same random-init torchvision net, batch and
top-1 targets, and correlates the two maps at **feature resolution** (Pearson r per image, after the
ReLU; the peer's upsampling is switched off by giving it the feature grid as its target size, so
only its min-max scaling remains, which r ignores). Peers are optional: a missing library skips its
cases. Where a peer departs from the paper or leaves a convention open (the sign of an SVD), the
case says so in ``note`` and, where possible, adds a row with the peer's convention aligned to ours,
so that what differs is measured rather than asserted.

Run alone (a few minutes on 2 CPU cores) or from ``benchmarks.run`` (section "CAM agreement").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("VISLIB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import vislib  # noqa: E402

from .peers import installed_libraries  # noqa: E402

THRESHOLD = 0.999
#: (model, layer, why this layer): the default layers, plus layers below a smooth part of the net
#: (SiLU / GELU) where ShapleyCAM's Hessian term is not zero.
#: (model, layer, what is above the layer). ShapleyCAM's Hessian term vanishes for the logit on these
#: random-init nets (piecewise-linear heads; ConvNeXt's layer scale starts at 1e-6, so its GELU blocks
#: are near identities), so ShapleyCAM is also compared for the softmax probability, where it does not.
#: Not efficientnet_b0: its random-init activations vanish (maps ~1e-15), where pytorch-grad-cam's
#: absolute 1e-7 in its min-max dominates; not mobilenet_v3: torch has no second derivative of
#: hardsigmoid (ours refuses ShapleyCAM there with that reason).
MODELS = (
    ("resnet18", "layer4", "default layer; ReLU / GAP / linear above it"),
    ("densenet121", "features.denseblock4", "functional F.relu and BN above the layer"),
    ("convnext_tiny", "features.6", "LayerNorm / GELU blocks above the layer"),
)
QUICK_MODELS = MODELS[:1]


@dataclass
class Case:
    """Our method (with options) against a peer callable returning N×h×w maps."""

    method: str
    peer: str
    run_peer: Callable[[dict], np.ndarray]
    options: dict | None = None
    note: str = ""
    library: str = "pytorch-grad-cam"
    score: str = "logit"


# --------------------------------------------------------------------------------------------------
# pytorch-grad-cam at feature resolution


def _pgc(cls_name: str, *, call: dict | None = None, init: dict | None = None,
         pre_relu: Callable | None = None, softmax: bool = False):
    """A peer running pytorch-grad-cam's class ``cls_name`` with its target size set to the feature grid.

    ``pre_relu(cam, setup)``: instead of the peer's output, rebuild its map from its own captured
    activations and gradients through ``cam.get_cam_image`` (its formula, before its ReLU), then align
    the sign with our convention and apply the ReLU: for methods whose sign the peer leaves open.
    """

    def run(s: dict) -> np.ndarray:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

        model = copy.deepcopy(s["model"]).eval()
        module = model.get_submodule(s["layer"])
        cam = getattr(pytorch_grad_cam, cls_name)(model=model, target_layers=[module], **(init or {}))
        h, w = s["grid"]
        cam.get_target_width_height = lambda _x: (w, h)
        target = ClassifierOutputSoftmaxTarget if softmax else ClassifierOutputTarget
        targets = [target(int(t)) for t in s["targets"]]
        try:
            out = cam(input_tensor=s["inputs"].clone(), targets=targets, **(call or {}))
            if pre_relu is not None:
                out = pre_relu(cam, s, targets)
        finally:
            cam.activations_and_grads.release()
        return np.asarray(out, dtype=np.float64)

    return run


def _aligned_projection(eigen_smooth: bool):
    """pytorch-grad-cam's projection before its ReLU, its sign turned to correlate with the map it
    replaces (Σ over channels), as ours does; then the ReLU."""

    def rebuild(cam, s, targets):
        A = cam.activations_and_grads.activations[0].numpy()
        g = cam.activations_and_grads.gradients[0].numpy()
        pre = cam.get_cam_image(s["inputs"], None, targets, A, g, eigen_smooth)
        weighted = _pgc_weighted(cam, s, targets, A, g)
        sign = np.sign(np.sum(pre * weighted.sum(axis=1), axis=(1, 2)))
        sign[sign == 0] = 1
        return np.maximum(pre * sign[:, None, None], 0)

    return rebuild


def _pgc_weighted(cam, s, targets, A, g) -> np.ndarray:
    """The weighted activations whose sum is the peer's map (g ⊙ A for Eigen-Grad-CAM)."""
    name = type(cam).__name__
    if name == "EigenGradCAM":
        return g * A
    if name == "LayerCAM":
        return np.maximum(g, 0) * A
    weights = cam.get_cam_weights(s["inputs"], None, targets, A, g)
    return weights[:, :, None, None] * A


def _finer_pgc(alpha: float, *, detach_weights: bool = False):
    """pytorch-grad-cam's FinerCAM (Grad-CAM base, 3 most similar classes). With
    ``detach_weights`` its target holds the softmax weights constant, as ours does."""

    def run(s: dict) -> np.ndarray:
        from pytorch_grad_cam import FinerCAM
        from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

        model = copy.deepcopy(s["model"]).eval()
        module = model.get_submodule(s["layer"])
        cam = FinerCAM(model=model, target_layers=[module])
        h, w = s["grid"]
        cam.base_cam.get_target_width_height = lambda _x: (w, h)
        targets = None
        if detach_weights:
            with torch.no_grad():
                logits = model(s["inputs"])
            targets = []
            for row, t in zip(logits, s["targets"], strict=True):
                gap = (row - row[int(t)]).abs()
                gap[int(t)] = float("inf")
                others = gap.argsort()[:3].tolist()
                targets.append(_ConstantWeights(int(t), others, alpha, torch.softmax(row, 0)[others]))
        try:
            out = cam(input_tensor=s["inputs"].clone(), targets=targets, alpha=alpha)
        finally:
            cam.base_cam.activations_and_grads.release()
        assert FinerWeightedTarget  # the class whose weights ``_ConstantWeights`` holds constant
        return np.asarray(out, dtype=np.float64)

    return run


class _ConstantWeights:
    """pytorch-grad-cam's FinerWeightedTarget with the softmax weights taken as constants."""

    def __init__(self, main: int, others: list[int], alpha: float, probs: torch.Tensor):
        self.main, self.others, self.alpha = main, others, alpha
        self.weights = (probs / probs.sum()).detach()

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return sum(w * (output[self.main] - self.alpha * output[d]) for w, d in zip(self.weights, self.others,
                                                                                      strict=True))


def _ours(method: str):
    """vislib's own ``method`` on the same batch (a reference row, not a peer)."""

    def run(s: dict) -> np.ndarray:
        result = vislib.explain(s["bundle"], s["inputs"], [method], target=s["targets"].tolist(),
                                score=s["score"])
        return result.raw[method].astype(np.float64)

    return run


def _fused_torchcam(layers: list[str], *, paper_scaling: bool = False):
    """torch-cam's LayerCAM on several layers, fused by its ``fuse_cams`` or, with ``paper_scaling``,
    its per-layer maps fused by vislib's :func:`~vislib.methods.cam_passes.fuse_maps` (eq. 9 on the
    shallow maps only)."""

    def run(s: dict) -> np.ndarray:
        from torchcam.methods import LayerCAM

        model = copy.deepcopy(s["model"]).eval()
        extractor = LayerCAM(model, target_layer=layers, input_shape=tuple(s["inputs"].shape[1:]))
        try:
            scores = model(s["inputs"])
            cams = extractor(class_idx=[int(t) for t in s["targets"]], scores=scores,
                             normalized=not paper_scaling)
            if paper_scaling:
                from vislib.methods.cam_passes import fuse_maps

                fused = fuse_maps([c.detach() for c in cams])
            else:
                fused = extractor.fuse_cams(cams)
        finally:
            extractor.remove_hooks()
        return fused.detach().double().numpy()

    return run


EIGEN_NOTE = ("pytorch-grad-cam leaves the SVD's sign open (its ReLU may keep the wrong half); compared "
              "with its projection turned to correlate with Σ_k of the weighted activations, as ours is")
FINER_NOTE = ("pytorch-grad-cam differentiates through its softmax comparison weights (a term the paper's "
              "weighted mean of contrastive maps does not have); the second row holds them constant")
FUSION_NOTE = ("torch-cam applies tanh(2·M) to every layer's min-max scaled map; LayerCAM (eq. 9) and ours "
               "scale the shallow maps only, each divided by its maximum")
SHAPLEY_NOTE = "softmax probability: S is not linear in A above the layer, so H·A ≠ 0"


def cases(libraries: dict[str, str]) -> list[Case]:
    out = []
    if "pytorch-grad-cam" in libraries:
        out += [
            Case("gradcam_elementwise", "GradCAMElementWise", _pgc("GradCAMElementWise")),
            Case("eigengradcam", "EigenGradCAM (sign aligned)", _pgc("EigenGradCAM",
                 pre_relu=_aligned_projection(False)), note=EIGEN_NOTE),
            Case("eigengradcam", "EigenGradCAM (as shipped)", _pgc("EigenGradCAM"), note=EIGEN_NOTE),
            Case("kpcacam", "KPCA_CAM", _pgc("KPCA_CAM")),
            Case("shapleycam", "ShapleyCAM", _pgc("ShapleyCAM")),
            Case("shapleycam", "ShapleyCAM, softmax target", _pgc("ShapleyCAM", softmax=True),
                 score="probability", note=SHAPLEY_NOTE),
            Case("shapleycam", "Grad-CAM (how far the Hessian term moves the map)", _ours("gradcam"),
                 score="probability", note=SHAPLEY_NOTE, library="vislib"),
            Case("finercam", "FinerCAM (as shipped)", _finer_pgc(1.0), note=FINER_NOTE),
            Case("finercam", "FinerCAM (weights constant)", _finer_pgc(1.0, detach_weights=True),
                 note=FINER_NOTE),
            Case("gradcam", "GradCAM aug_smooth", _pgc("GradCAM", call={"aug_smooth": True}),
                 options={"aug_smooth": True}),
            Case("gradcam", "GradCAM eigen_smooth (sign aligned)",
                 _pgc("GradCAM", call={"eigen_smooth": True}, pre_relu=_aligned_projection(True)),
                 options={"eigen_smooth": True}, note=EIGEN_NOTE),
            Case("layercam", "LayerCAM eigen_smooth (sign aligned)",
                 _pgc("LayerCAM", call={"eigen_smooth": True}, pre_relu=_aligned_projection(True)),
                 options={"eigen_smooth": True}, note=EIGEN_NOTE),
        ]
    return out


def fusion_cases(libraries: dict[str, str], model_name: str) -> list[Case]:
    if "torchcam" not in libraries or model_name != "resnet18":
        return []
    return [Case("layercam", "LayerCAM fuse_cams(layer3, layer4)", _fused_torchcam(["layer3", "layer4"]),
                 options={"fuse_layers": ["layer3"]}, note=FUSION_NOTE, library="torchcam"),
            Case("layercam", "LayerCAM per-layer maps, fused by eq. 9 on the shallow map",
                 _fused_torchcam(["layer3", "layer4"], paper_scaling=True),
                 options={"fuse_layers": ["layer3"]},
                 note="torch-cam's per-layer maps (before its min-max), our fusion: checks both layers' "
                      "gradients",
                 library="torchcam")]


# --------------------------------------------------------------------------------------------------
# Running


def pearson_per_image(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    out = []
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    for x, y in zip(a, b, strict=True):
        x, y = x - x.mean(), y - y.mean()
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        out.append(None if nx == 0 or ny == 0 else float(x @ y / (nx * ny)))
    return out


def make_inputs(batch: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images (low-frequency blobs plus a little noise) in a normalised input space."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 7, 7, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return smooth + 0.1 * torch.randn(batch, 3, size, size, generator=gen)


def run_model(name: str, layer: str, why: str, libraries: dict[str, str], *, batch: int, size: int, seed: int,
              log: Callable[[str], None]) -> list[dict]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).eval()
    bundle = vislib.load_model(model, default_layer=layer, device="cpu")
    inputs = make_inputs(batch, size, seed)
    with torch.no_grad():
        targets = bundle.logits(inputs).argmax(dim=1)
    grid = tuple(bundle.layers[layer][1:])
    setup = {"model": model, "layer": layer, "inputs": inputs, "targets": targets, "grid": grid,
             "bundle": bundle}
    rows = []
    for case in cases(libraries) + fusion_cases(libraries, name):
        log(f"{name} {layer}: {case.method} vs {case.peer}")
        row = {"model": name, "layer": layer, "layer_note": why, "method": case.method,
               "options": case.options or {}, "library": case.library, "peer": case.peer, "note": case.note,
               "score": case.score}
        setup["score"] = case.score
        try:
            started = time.perf_counter()
            ours = vislib.explain(bundle, inputs, [case.method], target=targets.tolist(), score=case.score,
                                  options={case.method: case.options or {}}).raw[case.method]
            theirs = case.run_peer(setup)
            if ours.shape != theirs.shape:
                theirs = _resize(theirs, ours.shape[-2:])
            r = pearson_per_image(ours, theirs)
            valid = [x for x in r if x is not None]
            row.update(r=r, r_min=min(valid) if valid else None,
                       r_mean=float(np.mean(valid)) if valid else None, flat=len(r) - len(valid),
                       seconds=time.perf_counter() - started, grid=list(ours.shape[-2:]))
        except Exception as exc:  # a peer failing is a result, not a crash
            row.update(error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
    return rows


def _resize(maps: np.ndarray, size) -> np.ndarray:
    t = torch.as_tensor(maps, dtype=torch.float64).unsqueeze(1)
    up = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


def run(*, quick: bool = False, batch: int = 2, size: int = 224, seed: int = 0, models=None,
        log: Callable[[str], None] = lambda msg: None) -> dict:
    """All cases on all models: ``{"threshold", "peers", "rows"}`` (plain data, JSON-ready)."""
    libraries = installed_libraries()
    chosen = [m for m in MODELS if models is None or m[0] in models] if models or not quick else QUICK_MODELS
    rows = []
    for name, layer, why in chosen:
        rows += run_model(name, layer, why, libraries, batch=batch, size=size, seed=seed, log=log)
    return {"threshold": THRESHOLD, "peers": libraries, "batch": batch, "size": size, "rows": rows}


def render_markdown(result: dict) -> str:
    lines = [f"Pearson r per image at feature resolution (min / mean over a batch of {result['batch']}, "
             f"{result['size']} px, random-init weights); threshold {result['threshold']}.", "",
             "| model · layer | ours | peer | r min | r mean | ok | note |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ours = row["method"] + "".join(f" {k}={v}" for k, v in row["options"].items())
        ours += " (probability)" if row.get("score") == "probability" else ""
        where, peer = f"{row['model']} · {row['layer']}", f"{row['library']} {row['peer']}"
        if "error" in row:
            lines.append(f"| {where} | {ours} | {peer} | – | – | error | {row['error']} |")
            continue
        rmin, rmean = row["r_min"], row["r_mean"]
        ok = "–" if rmin is None else "yes" if rmin >= result["threshold"] else "no"
        ok = "reference" if row["library"] == "vislib" else ok
        fmt = lambda x: "–" if x is None else f"{x:.5f}"  # noqa: E731
        lines.append(f"| {where} | {ours} | {peer} | {fmt(rmin)} | {fmt(rmean)} | {ok} | {row['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agreement_cam",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="resnet18 only")
    p.add_argument("--models", help="comma-separated subset of " + ", ".join(m[0] for m in MODELS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")] if args.models else None

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    result = run(quick=args.quick, batch=args.batch, size=args.size, models=models, log=log)
    print(render_markdown(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
