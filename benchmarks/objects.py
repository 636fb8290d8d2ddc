"""``python -m benchmarks.objects``: detectors side by side with the peers, in one run.

Rows (medians of ``--repeats`` interleaved runs; CPU unless ``--device cuda``):

- **box Grad-CAM**: Grad-CAM of one box on ``fasterrcnn_mobilenet_v3_large_320_fpn`` (random weights
  with the thresholds lowered unless ``--pretrained`` finds the COCO checkpoint in the cache), as a
  multiple of the detector's own forward, beside pytorch-grad-cam's GradCAM with its
  FasterRCNNBoxScoreTarget on the same layer; Pearson r of the two maps.
- **D-RISE**: ours (masked forwards batched) and vision-explanation-methods' ``DRISE_saliency`` (one
  forward per mask) with the same number of masks, on the bundled ``shapes_det`` and a generated test
  scene; r of the two maps (different random masks: Monte-Carlo noise bounds it below 1).
- **5 boxes, one forward**: :func:`vislib.objects.explain_boxes` on five detections (one forward, five
  backward passes) against five separate explanations.

Results go to ``results/objects-<timestamp>/`` (results.md, results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("VISLIB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vislib  # noqa: E402
from vislib.data.scenes import make_scene  # noqa: E402
from vislib.models import lower_thresholds, pretrained_available  # noqa: E402
from vislib.objects import box_bundle, explain_boxes  # noqa: E402

DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _detector(pretrained: bool, device: str):
    weights = "default" if pretrained and pretrained_available(DETECTOR) else None
    bundle = vislib.load_model(DETECTOR, weights=weights, device=device)
    if weights is None:
        lower_thresholds(bundle.model)  # a random detector returns nothing above its thresholds
    return bundle, "COCO" if weights else "random (thresholds lowered)"


def box_gradcam_row(repeats: int, pretrained: bool, device: str) -> dict:
    bundle, weights = _detector(pretrained, device)
    image = make_scene("test", 0).image
    dets = vislib.detect(bundle, image)
    box, label = dets.boxes[:1], dets.labels[:1]
    x, _ = bundle.prepare([image])
    view = box_bundle(bundle, box, label)
    layer = bundle.model.get_submodule(bundle.default_layer)
    row = {"row": "box Grad-CAM", "model": DETECTOR, "weights": weights, "layer": bundle.default_layer}
    forward = lambda: bundle.model(x)  # noqa: E731
    ours = lambda: vislib.explain(view, image, methods=["gradcam"], target=0)  # noqa: E731
    with torch.no_grad():
        forward()  # warm-up
    ours()
    t_fwd, t_ours = [], []
    for _ in range(repeats):
        with torch.no_grad():
            t_fwd.append(_time(forward, 1)[0])
        t, out = _time(ours, 1)
        t_ours.append(t)
    row.update(forward_s=statistics.median(t_fwd), ours_s=statistics.median(t_ours))
    row["ours_x_forward"] = row["ours_s"] / row["forward_s"]
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    except ImportError:
        row["peer"] = "pytorch-grad-cam not installed"
        return row
    cam = GradCAM(bundle.model, target_layers=[layer])
    target = [FasterRCNNBoxScoreTarget(labels=[int(label[0])], bounding_boxes=[box[0]])]
    t_peer, peer = _time(lambda: cam(x, targets=target), repeats)
    row.update(peer="pytorch-grad-cam 1.5.7 GradCAM + FasterRCNNBoxScoreTarget", peer_s=t_peer,
               peer_x_forward=t_peer / row["forward_s"], r=_pearson(out.maps["gradcam"], peer[0]))
    return row


def drise_row(masks: int, repeats: int, device: str) -> dict:
    bundle = vislib.load_model("shapes_det", device=device)
    scene = make_scene("test", 3)
    dets = vislib.detect(bundle, scene.image)
    box, label, score = dets.boxes[:1], dets.labels[:1], dets.scores[:1]
    view = box_bundle(bundle, box, label)
    opts = {"drise": {"masks": masks, "batch_size": 32}}
    row = {"row": "D-RISE", "model": "shapes_det", "masks": masks, "detection": dets.rows()[0]}
    t_ours, out = _time(lambda: vislib.explain(view, scene.image, methods=["drise"], target=0, options=opts),
                        repeats)
    row["ours_s"] = t_ours
    try:
        from vision_explanation_methods.explanations import common, drise
    except ImportError:
        row["peer"] = "vision-explanation-methods not installed"
        return row
    classes = len(bundle.labels)

    class Wrapper(common.GeneralObjectDetectionModelWrapper):
        def predict(self, x):
            with torch.no_grad():
                outs = bundle.model(x)
            return [common.DetectionRecord(
                bounding_boxes=o["boxes"], class_scores=common.expand_class_scores(o["scores"], o["labels"],
                                                                                   classes - 1),
                objectness_scores=torch.ones(len(o["scores"]))) for o in outs]

    x, _ = bundle.prepare([scene.image])
    target = [common.DetectionRecord(
        bounding_boxes=torch.tensor(box), objectness_scores=torch.ones(1),
        class_scores=common.expand_class_scores(torch.tensor(score), torch.tensor(label), classes - 1))]
    torch.manual_seed(0)
    t_peer, peer = _time(lambda: drise.DRISE_saliency(Wrapper(), x, target, masks, device=device), repeats)
    peer_map = peer[0][0]["detection"][0].cpu().numpy()
    row.update(peer="vision-explanation-methods 0.1.1 DRISE_saliency", peer_s=t_peer,
               speedup=t_peer / t_ours, r=_pearson(out.raw["drise"], peer_map))
    return row


def five_boxes_row(repeats: int, pretrained: bool, device: str) -> dict:
    bundle, weights = _detector(pretrained, device)
    image = make_scene("test", 0).image
    dets = vislib.detect(bundle, image)
    boxes, labels = dets.boxes[:5], dets.labels[:5]
    view = box_bundle(bundle, boxes, labels)
    x, _ = bundle.prepare([image])
    with torch.no_grad():
        t_fwd, _ = _time(lambda: bundle.model(x), repeats)
    t_shared, shared = _time(lambda: explain_boxes(bundle, image, boxes, labels), repeats)
    t_each, _ = _time(lambda: [vislib.explain(view, image, methods=["gradcam"], target=k) for k in range(5)],
                      repeats)
    return {"row": "5 boxes, one forward", "model": DETECTOR, "weights": weights, "forward_s": t_fwd,
            "shared_s": t_shared, "shared_x_forward": t_shared / t_fwd, "five_calls_s": t_each,
            "five_calls_x_forward": t_each / t_fwd, "forwards_shared": 1, "forwards_five_calls": 5,
            "shared_forward_s": shared.seconds["forward"], "shared_backward_s": shared.seconds["backward"]}


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# Detectors: vislib vs peers ({meta['machine']}, torch {meta['torch']}, {meta['threads']} "
             f"threads, {meta['when']})", ""]
    for row in rows:
        lines.append(f"## {row['row']}")
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in row.items()
                  if k != "row"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.objects", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--masks", type=int, default=500, help="D-RISE masks, the same for both libraries")
    p.add_argument("--rows", default="box,drise,five", help="comma-separated: box, drise, five")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = {r.strip() for r in args.rows.split(",")}
    rows = []
    if "box" in wanted:
        rows.append(box_gradcam_row(args.repeats, args.pretrained, args.device))
        print(rows[-1], flush=True)
    if "drise" in wanted:
        rows.append(drise_row(args.masks, args.repeats, args.device))
        print(rows[-1], flush=True)
    if "five" in wanted:
        rows.append(five_boxes_row(args.repeats, args.pretrained, args.device))
        print(rows[-1], flush=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "when": datetime.now().isoformat(timespec="seconds"),
            "device": args.device}
    out = args.out or Path("results") / f"objects-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (out / "results.md").write_text(render(rows, meta))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
