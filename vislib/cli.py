"""Command line: ``python -m vislib explain IMAGE --out DIR`` (and ``models``, ``methods``).

Bad input exits with code 2 and one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import VislibError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = _Parser(prog="python -m vislib", description="See what a convolutional network sees.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ex = sub.add_parser("explain", help="explain one image with one or more methods")
    ex.add_argument("image", help="image file (PNG, JPEG, WebP, BMP, ...)")
    ex.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    ex.add_argument("--weights", default="default",
                    help="'default' (bundled / torchvision pretrained), 'none' (random) or a state-dict path")
    ex.add_argument("--layer", default=None, help="target layer (default: the model's default layer)")
    ex.add_argument("--target", default=None, help="class index or label (default: the top-1 class)")
    ex.add_argument("--methods", default="gradcam", help="comma-separated method names")
    ex.add_argument("--score", default="logit", choices=["logit", "probability"])
    ex.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1]")
    ex.add_argument("--colormap", default="jet")
    ex.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ex.add_argument("--out", required=True, help="output folder")

    add_evaluate_parser(sub, DEFAULT_MODEL)
    add_layers_parser(sub, DEFAULT_MODEL)
    sub.add_parser("models", help="list the registered models")
    sub.add_parser("methods", help="list the methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "explain":
            return _explain(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "layers":
            return _layers(args)
        if args.command == "models":
            return _list_models()
        if args.command == "methods":
            return _list_methods()
    except VislibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless debugging
        if os.environ.get("VISLIB_DEBUG"):
            raise
        message = f"internal error: {type(exc).__name__}: {exc} (set VISLIB_DEBUG=1 for details)"
        print(message, file=sys.stderr)
        return 1
    return 0


def _explain(args) -> int:
    from .explain import explain
    from .imageio import load_image
    from .models import load_model
    from .render import COLORMAPS

    if args.colormap not in COLORMAPS:
        raise VislibError(f"unknown colormap {args.colormap!r}; available: {', '.join(COLORMAPS)}")
    if not 0.0 <= args.alpha <= 1.0:
        raise VislibError("--alpha must be between 0 and 1")
    image = load_image(args.image)
    weights = None if args.weights.lower() == "none" else args.weights
    bundle = load_model(args.model, weights=weights, device=args.device)
    result = explain(bundle, image, methods=args.methods, layer=args.layer,
                     target=args.target, score=args.score)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VislibError(f"cannot create output folder {out}: {exc.strerror}") from None
    result.input_image.save(out / "input.png")
    arrays = {}
    for method in result.methods:
        result.overlay(method, alpha=args.alpha, colormap=args.colormap).save(out / f"{method}.png")
        arrays[method] = result.maps[method]
        arrays[f"{method}_raw"] = result.raw[method]
    np.savez_compressed(out / "maps.npz", **arrays)
    scores = {
        "model": result.model,
        "weights": result.weights,
        "layer": result.layer,
        "score": result.score,
        "target": {"index": result.target, "label": result.target_label()},
        "top5": [{"index": i, "label": label, "probability": p} for i, label, p in result.top_k(5)],
        "flat": {m: bool(result.flat[m]) for m in result.methods},
        "timings_s": result.timings,
        "pass_timings_s": result.pass_timings,
    }
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    top = result.top_k(1)[0]
    print(f"{result.model}: predicted {top[1]} ({top[2]:.1%}); explained {result.target_label()!r} "
          f"at {result.layer} with {', '.join(result.methods)} → {out}")
    return 0


def _list_models() -> int:
    from .models import list_models, model_spec

    for name in list_models():
        spec = model_spec(name)
        print(f"{name:22s} {spec.source:12s} {spec.description}")
    return 0


def _list_methods() -> int:
    from .methods import METHODS

    print(f"{'name':22s} {'family':13s} {'passes':22s} paper")
    for name, cls in METHODS.items():
        print(f"{name:22s} {cls.family:13s} {cls.passes or '–':22s} {cls.paper or cls.title}")
    return 0


# --------------------------------------------------------------------------------------------------
# evaluate: a labelled dataset → metrics, tables and an offline HTML report


def add_evaluate_parser(sub, default_model: str) -> None:
    ev = sub.add_parser("evaluate", help="evaluate a model and its explanations on a labelled dataset")
    ev.add_argument("data", help="an ImageFolder folder or .zip (one folder per class), 'shapes' (the "
                                 "generated test split, with masks) or 'shapes+mark' (every image marked)")
    ev.add_argument("--model", default=default_model, help=f"model name (default: {default_model})")
    ev.add_argument("--weights", default="default", help="'default', 'none' (random) or a state-dict path")
    ev.add_argument("--layer", default=None, help="target layer (default: the model's default layer)")
    ev.add_argument("--methods", default="gradcam", help="comma-separated method names")
    ev.add_argument("--explain", default="predicted", choices=["predicted", "true"],
                    help="the class the maps explain (default: the predicted one)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--curves", type=int, default=20,
                    help="deletion/insertion curves for the first N images (default 20; 0: none)")
    ev.add_argument("--no-confidence", action="store_true", help="skip Average Drop / Increase in Confidence")
    ev.add_argument("--gallery", type=int, default=24, help="misclassified images shown in the report")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; on a busy shared CPU, 1 is often fastest)")
    ev.add_argument("--out", required=True, help="output folder")


def _evaluate(args) -> int:
    from .datasets import open_dataset
    from .evaluate import evaluate, html_report, write_tables
    from .hooks import resolve_layer
    from .models import load_model

    for name in ("limit", "batch_size", "curves", "gallery", "threads"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name in ("limit", "batch_size", "threads"))):
            raise VislibError(f"--{name.replace('_', '-')} must be a positive number")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .explain import parse_methods

    methods = parse_methods(args.methods)
    weights = None if args.weights.lower() == "none" else args.weights
    bundle = load_model(args.model, weights=weights, device=args.device)
    resolve_layer(bundle, args.layer)
    images = open_dataset(args.data, bundle.labels, limit=args.limit)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VislibError(f"cannot create output folder {out}: {exc.strerror}") from None
    for line in images.report.lines() if images.report else []:
        print(f"note: {line}", file=sys.stderr)
    result = evaluate(bundle, images, methods, layer=args.layer, explained=args.explain,
                      batch_size=args.batch_size, confidence=not args.no_confidence, curves=args.curves)
    write_tables(result, out)
    (out / "report.html").write_text(html_report(result, bundle=bundle, images=images, gallery=args.gallery),
                                     encoding="utf-8")
    summary = {
        "model": result.model, "weights": result.weights, "layer": result.layer, "data": result.dataset,
        "images": len(result), "accuracy": result.accuracy, "misclassified": int((~result.correct).sum()),
        "failed": [{"id": i, "reason": why} for i, why in result.failed], "explained": result.explained,
        "methods": [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                    for row in result.method_table()],
        "timings_s": result.timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{result.model} on {result.dataset}: accuracy {result.accuracy:.1%} on {len(result)} images, "
          f"{summary['misclassified']} misclassified → {out / 'report.html'}")
    return 0


# --------------------------------------------------------------------------------------------------
# layers: the layer table of a model (shapes as the methods see them) and the default's reason


def add_layers_parser(sub, default_model: str) -> None:
    ly = sub.add_parser("layers", help="a model's layers as the methods see them, and its default layer")
    ly.add_argument("--model", default=default_model, help=f"model name (default: {default_model})")
    ly.add_argument("--weights", default="none",
                    help="'none' (random: shapes do not depend on weights; the default), 'default' or a path")
    ly.add_argument("--all", action="store_true", help="also the modules that give no map")


def _layers(args) -> int:
    from .layers import layer_table_lines
    from .models import load_model

    weights = None if args.weights == "none" else args.weights
    bundle = load_model(args.model, weights=weights, device="cpu")
    for line in layer_table_lines(bundle, everything=args.all):
        print(line)
    return 0
