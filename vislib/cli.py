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

    sub.add_parser("models", help="list the registered models")
    sub.add_parser("methods", help="list the methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "explain":
            return _explain(args)
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

    for name, cls in METHODS.items():
        print(f"{name:22s} {cls.family:13s} {cls.title}")
    return 0
