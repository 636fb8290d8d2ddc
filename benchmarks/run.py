"""``python -m benchmarks.run``: every vislib method against the physical references and the peers.

Examples::

    python -m benchmarks.run --quick                    # CI smoke: a couple of minutes on 2 CPU cores
    python -m benchmarks.run                            # resnet50 + shapes_resnet, batch 1 and 16
    python -m benchmarks.run --methods gradcam,gradcam++ --batches 1 --no-scaling
    python -m benchmarks.run --scorecam                 # Score-CAM head to head: resnet50 layer4, batch 1
    python -m benchmarks.run --view                     # the dashboard's default view: ≤ 4.0× a forward
    python -m benchmarks.run --live                     # the Live page: frames/s with Grad-CAM

resnet50 runs with random weights unless ``--pretrained`` finds torchvision's checkpoint in the local
cache (nothing is ever downloaded): timing does not depend on the weights. Results go to
``results/bench-<timestamp>/`` (results.md, results.json, scaling.html/.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

os.environ.setdefault("VISLIB_OFFLINE", "1")  # a benchmark never downloads weights

import torch  # noqa: E402

import vislib  # noqa: E402
from vislib.errors import VislibError  # noqa: E402
from vislib.models import pretrained_available  # noqa: E402

from . import agreement_backprop  # noqa: E402
from . import peers as peer_lib  # noqa: E402
from .report import evaluate_promises, render_markdown, write_results  # noqa: E402
from .suite import BenchConfig, bench_bundle, scaling  # noqa: E402

# --quick: a smoke run for CI. resnet18 instead of resnet50, and the many-pass methods with reduced
# settings (shown next to their names in the table) so that every method and peer still runs.
QUICK = {
    "models": ["resnet18", "shapes_resnet"], "batches": [1, 2], "repeats": 1, "warmup": 1, "budget": 2.0,
    "peer_batches": [1], "scaling_model": "resnet18", "scaling_batches": [1, 2], "scaling_sizes": [224, 288],
    "options": {
        "smoothgrad": {"n_samples": 4, "batch_size": 4},
        "integrated_gradients": {"steps": 4, "batch_size": 4},
        "occlusion": {"patch": 56, "stride": 56},
        "scorecam": {"batch_size": 64},
        "sscam": {"batch_size": 64, "n_samples": 2},
        "iscam": {"batch_size": 64, "n_samples": 2},
        "ablationcam": {"batch_size": 64},
    },
}
# --scorecam: Score-CAM head to head on resnet18 layer4 (512 channels) and resnet50 layer4 (2048), batch 1:
# our call and each peer's alternately (--pairs, default 3 on resnet18, 1 on resnet50: 15 minutes), each
# of ours from a cold start (building the frozen copy included), no row budget to stop them.
# shapes_resnet adds the agreement on a trained model, whose channel softmax is far from uniform.
SCORECAM = {
    "models": ["resnet18", "resnet50", "shapes_resnet"], "methods": ["scorecam"], "batches": [1],
    "repeats": 1, "warmup": 0, "budget": 3600.0, "no_scaling": True, "options": {},
    "pairs": {"resnet18": 3, "resnet50": 1, "shapes_resnet": 1},
}
# --gpu: what scripts/gpu-check.sh runs on a CUDA machine: every method at batch 1, 16 and 64 on resnet50
# with the peers side by side, Score-CAM also under bf16 / fp16 autocast (agreement with fp32 reported),
# a short scaling sweep; row budget 8 s (peers 30 s), Score-CAM's family first, the run stopped by
# --deadline. `--devices cpu` with small sizes (--models resnet18@64 --batches 1,2) is its dry run.
GPU = {
    "models": ["resnet50"], "batches": [1, 16, 64], "repeats": 3, "warmup": 1, "budget": 8.0,
    "peer_budget": 30.0,  # the peers batch their many forwards: their predicted time is an upper bound
    "first": ["scorecam", "sscam", "iscam"],  # the rows the check is for come before the deadline can bite
    "peer_batches": None, "devices": ["cuda"], "scaling_model": "resnet50", "scaling_batches": [1, 16, 64],
    "scaling_sizes": [224, 448], "options": {},
    "variants": [("scorecam[bf16]", "scorecam", {"precision": "bf16"}),
                 ("scorecam[fp16]", "scorecam", {"precision": "fp16"})],
}
# --view: the dashboard's default view (six CAMs + guided backprop + Deconvnet, one call) and adding one
# CAM to it from the cache, on resnet50 and densenet121 at batch 1 and 16 (issue 17's promise: ≤ 4.0×
# a forward), nothing else: about 5 minutes on 2 CPU cores.
VIEW = {
    "models": ["resnet50", "densenet121"], "methods": [], "batches": [1, 16], "repeats": 5, "warmup": 1,
    "budget": 120.0, "no_peers": True, "no_scaling": True, "no_agreement": True, "options": {},
}
FULL = {
    "scaling_model": "resnet50", "options": {},
    "models": ["resnet50", "shapes_resnet"], "batches": [1, 16], "repeats": 3, "warmup": 1, "budget": 30.0,
    "peer_batches": None, "scaling_batches": [1, 2, 4, 8, 16, 32, 64],
    "scaling_sizes": [224, 288, 352, 416, 512],
}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke settings (< 2 minutes on 2 CPU cores)")
    p.add_argument("--scorecam", action="store_true",
                   help="Score-CAM head to head: resnet18 and resnet50 layer4, batch 1 (about 20 minutes "
                        "on 2 CPU cores)")
    p.add_argument("--view", action="store_true",
                   help="the dashboard's default view and adding one CAM to it from the cache: resnet50 and "
                        "densenet121, batch 1 and 16 (about 5 minutes on 2 CPU cores)")
    p.add_argument("--live", action="store_true",
                   help="the Live page's frames/s (Grad-CAM, synthetic camera): see benchmarks/live.py")
    p.add_argument("--gpu", action="store_true",
                   help="the CUDA preset of scripts/gpu-check.sh (resnet50, batches 1, 16, 64, peers, "
                        "autocast)")
    p.add_argument("--pairs", type=int,
                   help="head to head: (ours, peer) call pairs per model, ours from a cold start")
    p.add_argument("--deadline", type=float,
                   help="seconds after which the remaining rows are skipped and the results written")
    p.add_argument("--models", type=_names,
                   help="comma-separated models, NAME or NAME@SIDE (default resnet50,shapes_resnet)")
    p.add_argument("--methods", type=_names, help="comma-separated vislib methods (default: all registered)")
    p.add_argument("--batches", type=_ints, help="batch sizes (default 1,16)")
    p.add_argument("--size", type=int, help="input side in pixels (default: each model's own)")
    p.add_argument("--repeats", type=int, help="timed runs per row after the warm-up (default 3)")
    p.add_argument("--warmup", type=int, help="discarded warm-up runs per row (default 1)")
    p.add_argument("--budget", type=float, help="seconds one row may take (default 30)")
    p.add_argument("--no-peers", action="store_true", help="skip pytorch-grad-cam, torchcam and Captum")
    p.add_argument("--no-agreement", action="store_true",
                   help="skip the CAM-family agreement with pytorch-grad-cam (benchmarks.agreement_cam)")
    p.add_argument("--peer-budget", type=float, help="seconds a peer's row may take (default: --budget)")
    p.add_argument("--peer-batches", type=_ints, help="batch sizes at which the peers run (default: all)")
    p.add_argument("--devices", type=_names, help="cpu and/or cuda (default: cpu, plus cuda when present)")
    p.add_argument("--no-scaling", action="store_true", help="skip the batch-size / input-size sweep")
    p.add_argument("--scaling-model", help="model of the scaling sweep (default resnet50)")
    p.add_argument("--scaling-batches", type=_ints)
    p.add_argument("--scaling-sizes", type=_ints)
    p.add_argument("--pretrained", action="store_true",
                   help="use torchvision's pretrained weights when they are in the local cache")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="results folder (default results/bench-<timestamp>)")
    p.add_argument("--options", type=json.loads,
                   help='per-method options as JSON, e.g. \'{"smoothgrad": {"n_samples": 10}}\'')
    args = p.parse_args(argv)
    preset = (QUICK if args.quick else SCORECAM if args.scorecam else GPU if args.gpu
              else VIEW if args.view else FULL)
    for key, value in preset.items():
        current = getattr(args, key, None)
        if current is None or current is False:  # not given (a flag left off); an explicit 0 stays
            setattr(args, key, value)
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if getattr(args, "first", None) and args.methods is None:  # every method, these first
        args.methods = [m for m in args.first if m in vislib.METHODS]
        args.methods += [m for m in vislib.METHODS if m not in args.methods]
    return args


def load_bundle(name: str, device: str, pretrained: bool, log) -> tuple[object | None, str]:
    """The model, or None and why it was skipped (a bundled model whose weights are not there yet)."""
    try:
        source = vislib.models.model_spec(name).source
    except VislibError as exc:
        return None, str(exc)
    weights = "default"
    if source == "torchvision":
        weights = "default" if pretrained and pretrained_available(name) else None
        if pretrained and weights is None:
            log(f"{name}: pretrained weights not cached, using random weights (timing does not depend "
                "on them)")
    try:
        torch.manual_seed(0)
        return vislib.load_model(name, weights=weights, device=device), ""
    except VislibError as exc:
        return None, f"{name}: {exc}"


def environment(args) -> dict:
    libs = peer_lib.installed_libraries() if not args.no_peers else {}
    return {
        "started": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "vislib": vislib.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"torch threads {torch.get_num_threads()}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cuda": cuda_description(),
        "peers": ", ".join(f"{k} {v}" for k, v in libs.items()) or "none installed",
        "methods": ", ".join(vislib.METHODS),
        "settings": f"batches {args.batches}, {args.repeats} run(s) after {args.warmup} warm-up, "
                    f"row budget {args.budget:g} s" + (" (--quick)" if args.quick else ""),
        "method options": json.dumps(args.options) if args.options else "defaults",
    }


def cuda_description() -> str:
    """The GPU, torch's CUDA and cuDNN versions and the TF32 settings (they change float32 results)."""
    if not torch.cuda.is_available():
        return "not available"
    return (f"{torch.cuda.get_device_name(0)}, torch CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}, TF32 convolutions {torch.backends.cudnn.allow_tf32}, "
            f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")


def pairs_for(args, model: str) -> int:
    """Head-to-head pairs for ``model``: --pairs, else the preset's per-model count (0: no head to head)."""
    if isinstance(args.pairs, int):
        return args.pairs
    return (args.pairs or {}).get(model, 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.live:
        return _live(args)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    config = BenchConfig(
        batches=args.batches, repeats=args.repeats, warmup=args.warmup, budget_s=args.budget,
        methods=args.methods, peers=not args.no_peers, peer_batches=args.peer_batches, size=args.size,
        options=args.options, log=log, variants=tuple(getattr(args, "variants", None) or ()),
        deadline=started + args.deadline if args.deadline else None, peer_budget_s=args.peer_budget,
    )
    try:
        config.method_names()
    except VislibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "cuda" in args.devices and not torch.cuda.is_available():
        print("error: --devices cuda (or --gpu) needs a CUDA device that torch can see; "
              "`--devices cpu` runs the same preset on the CPU", file=sys.stderr)
        return 2
    results = {"meta": environment(args), "runs": [], "scaling": [], "skipped": []}
    for device in args.devices:
        for entry in args.models:
            name, _, side = entry.partition("@")  # "resnet18@112": a model at its own input size
            bundle, why = load_bundle(name, device, args.pretrained, log)
            if bundle is None:
                log(f"skipping {name} on {device}: {why}")
                results["skipped"].append(f"{name} on {device}: {why}")
                continue
            run_config = replace(config, size=int(side) if side else config.size, pairs=pairs_for(args, name))
            results["runs"].append(bench_bundle(bundle, run_config, device_label=device))
        if not args.no_scaling and config.out_of_time():
            results["skipped"].append(f"scaling on {device}: past the run's deadline")
        elif not args.no_scaling:
            bundle, why = load_bundle(args.scaling_model, device, args.pretrained, log)
            if bundle is None:
                results["skipped"].append(f"scaling on {device}: {why}")
            else:
                results["scaling"].append(scaling(bundle, batches=args.scaling_batches,
                                                  sizes=args.scaling_sizes, config=config))
    if not args.no_peers and not args.no_agreement:
        from . import agreement_cam

        results["agreement_cam"] = agreement_cam.run(quick=args.quick, log=log)
    wanted = set(config.method_names()) & {m for m, _ in agreement_backprop.CASES}
    if not args.no_peers and not args.no_agreement and wanted:  # FullGrad, Input×Gradient, LRP
        results["agreement_backprop"] = agreement_backprop.run_agreement(
            ["resnet18"] if args.quick else ["resnet18", "vgg16"], size=64 if args.quick else 112,
            batch=1 if args.quick else 2, repeats=1 if args.quick else args.repeats, methods=wanted, log=log)
    results["promises"] = evaluate_promises(results)
    results["meta"]["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["meta"]["total time"] = f"{time.perf_counter() - started:.0f} s"
    out = args.out or Path("results") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    written = write_results(results, out)
    print(render_markdown(results))
    log("wrote " + ", ".join(str(p) for p in written))
    return 0


def _live(args) -> int:
    from . import live

    rows = live.run(seconds=3.0 if args.quick else 10.0)
    out = args.out or Path("results") / f"live-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": environment(args), "live": rows}, indent=2))
    print(live.markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
