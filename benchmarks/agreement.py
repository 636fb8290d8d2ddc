"""``python -m benchmarks.agreement``: Score-CAM, SS-CAM and IS-CAM against torch-cam, map for map.

The reference harness of the masked-forward methods: random-init torchvision nets (agreement and
timing do not need trained weights), the same inputs, targets and options on both sides, SS-CAM with
the same noise (torch-cam seeded with our ``seed``; the streams coincide when H·W is a multiple of
16). Pearson r at feature resolution (mean over the batch), target r ≥ 0.999, and the time of one
call each, run back to back. Prints a markdown table; exit code 1 if a pair misses the target, 2 when
torch-cam is not installed (``pip install -r requirements-bench.txt``).

Examples::

    python -m benchmarks.agreement                                   # resnet18@128 ×2, resnet50@64
    python -m benchmarks.agreement --cases resnet18@96x1 --methods sscam --n-samples 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("VISLIB_OFFLINE", "1")

import torch  # noqa: E402

import vislib  # noqa: E402

from . import peers as peer_lib  # noqa: E402
from .measure import pearson  # noqa: E402
from .suite import make_inputs, top1_targets  # noqa: E402

TARGET_R = 0.999
CASES = ["resnet18@128x2", "resnet50@64x1"]  # model@side x batch
METHODS = ["scorecam", "sscam", "iscam"]


def parse_case(text: str) -> tuple[str, int, int]:
    name, _, rest = text.partition("@")
    side, _, batch = rest.partition("x")
    return name, int(side or 224), int(batch or 1)


def compare(name: str, side: int, batch: int, method: str, options: dict, device: str = "cpu") -> dict:
    """One model, one method: our map and torch-cam's, their Pearson r and the time of one call each."""
    torch.manual_seed(0)
    bundle = vislib.load_model(name, weights=None, device=device)
    inputs = make_inputs(bundle, batch, side)
    targets = top1_targets(bundle.model, inputs)
    (peer,) = [p for p in peer_lib.peers_for(method) if p.library == "torchcam"]
    setup = peer_lib.peer_setup(bundle.model, bundle.default_layer, inputs, targets, options)
    run, close = peer.make(setup)
    try:
        start = time.perf_counter()
        ours = vislib.explain(bundle, inputs, [method], target=targets.tolist(), options={method: options})
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = run()
        theirs_s = time.perf_counter() - start
    finally:
        close()
    raw = torch.as_tensor(ours.raw[method])
    return {
        "model": f"{name}@{side}", "batch": batch, "layer": bundle.default_layer, "method": method,
        "options": options, "feature": list(raw.shape[-2:]), "r": pearson(raw, theirs.cpu()),
        "ours_s": ours_s, "theirs_s": theirs_s, "forwards": ours.extras[method].get("forwards"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help="model@side x batch, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-samples", type=int, default=4, help="SS-CAM / IS-CAM draws (default 4)")
    p.add_argument("--sigma", type=float, default=2.0, help="SS-CAM noise (default 2.0, torch-cam's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if "torchcam" not in peer_lib.installed_libraries():
        print("error: torch-cam is not installed (pip install -r requirements-bench.txt)", file=sys.stderr)
        return 2
    per_method = {
        "scorecam": {},
        "sscam": {"n_samples": args.n_samples, "sigma": args.sigma, "seed": args.seed},
        "iscam": {"n_samples": args.n_samples},
    }
    rows = []
    for case in args.cases.split(","):
        name, side, batch = parse_case(case.strip())
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            row = compare(name, side, batch, method, per_method.get(method, {}), args.device)
            print(f"[{time.strftime('%H:%M:%S')}] {row['model']} {method}: r = {row['r']}", file=sys.stderr)
            rows.append(row)
    print(f"| model (layer, feature) | batch | method | options | forwards | r vs torch-cam | ours s | "
          f"torch-cam s | theirs/ours | r ≥ {TARGET_R} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    missed = 0
    for r in rows:
        ok = r["r"] is not None and r["r"] >= TARGET_R
        missed += not ok
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        where = f"{r['model']} ({r['layer']}, {'×'.join(map(str, r['feature']))})"
        print(f"| {where} | {r['batch']} | {r['method']} | {opts} | {r['forwards']} | {r['r']:.6f} | "
              f"{r['ours_s']:.1f} | {r['theirs_s']:.1f} | "
              f"{r['theirs_s'] / r['ours_s']:.2f}× | {'met' if ok else 'MISSED'} |")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
