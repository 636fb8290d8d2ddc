"""Agreement of the backprop family's newer methods with their reference implementations.

``python -m benchmarks.agreement_backprop [--models resnet18,vgg16] [--size 112] [--batch 2]``

=====================  ==========================================  ==========================================
ours                   reference                                   called
=====================  ==========================================  ==========================================
``fullgrad``           pytorch-grad-cam ``FullGrad``               ``FullGrad(model, [])(input, targets)``
``input_x_gradient``   Captum ``InputXGradient``                   ``.attribute(x, target=t)``
``lrp`` (both          zennit (used directly on its own copy)      the composite with ``ResNetCanonizer`` /
composites)                                                        ``VGGCanonizer``, output relevance e_t·z_t
=====================  ==========================================  ==========================================

Random-initialised torchvision networks (nothing is downloaded), with one change: their batch norms'
statistics and affine parameters and the convolutions' and linear layers' biases are randomised,
because torchvision initialises them so that every bias folds to zero, and then FullGrad's bias terms
and LRP's bias absorption would be absent from the comparison. Pearson r per image (mean over the
batch) between our raw output and the reference's: N×H×W maps for FullGrad, N×3×H×W signals for the
others. Times: our call paired with a forward pass (× forward), the reference's call alone.

The adapters are also :class:`benchmarks.peers.PeerMethod` entries (:data:`PEERS`), so
``python -m benchmarks.run`` lists them beside the other peers; the run calls :func:`run_agreement`
as well (unless ``--no-peers``) and reports its table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from .peers import PeerMethod, PeerSetup, _captum, installed_libraries, peer_setup

REFERENCE_R = 0.999

FULLGRAD_NOTE = (
    "same definition and ψ (per-channel min-max of |b·∂S/∂z|, bilinear, align_corners=False); "
    "pytorch-grad-cam divides by max + 1e-7 where vislib divides by the exact range (they differ only for "
    "a channel whose range is below ~1e-7) and skips batch norms without affine parameters (vislib folds "
    "their bias −μ/√(σ²+ε))."
)
LRP_NOTE = "zennit called directly on its own copy, same composite and canonizer; output relevance e_t·z_t."


def _quiet(fn: Callable):
    """Call ``fn`` with stdout silenced (pytorch-grad-cam prints that FullGrad ignores target_layers)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def _pgc_fullgrad(s: PeerSetup):
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = _quiet(lambda: FullGrad(model=s.model, target_layers=[]))
    targets = [ClassifierOutputTarget(int(t)) for t in s.targets]

    def run():
        return torch.from_numpy(cam(input_tensor=s.inputs, targets=targets))  # N×H×W in [0, 1]

    return run, cam.activations_and_grads.release


def _zennit_lrp(s: PeerSetup):
    import zennit.composites
    import zennit.torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from vislib.methods.lrp import unsupported_reason
    from vislib.models import IMAGENET_MEAN, IMAGENET_STD

    reason = unsupported_reason(s.model)
    if reason is not None:
        raise RuntimeError(reason)
    resnet = any(isinstance(m, (BasicBlock, Bottleneck)) for m in s.model.modules())
    canonizers = [zennit.torchvision.ResNetCanonizer() if resnet else zennit.torchvision.VGGCanonizer()]
    epsilon = float(s.options.get("epsilon", 1e-6))
    if s.options.get("composite", "epsilon_plus_flat") == "epsilon_gamma_box":
        mean = torch.tensor(s.options.get("mean", IMAGENET_MEAN)).view(1, -1, 1, 1)
        std = torch.tensor(s.options.get("std", IMAGENET_STD)).view(1, -1, 1, 1)
        gamma = float(s.options.get("gamma", 0.25))
        composite = zennit.composites.EpsilonGammaBox(
            low=(0 - mean) / std, high=(1 - mean) / std, epsilon=epsilon, gamma=gamma, canonizers=canonizers)
    else:
        composite = zennit.composites.EpsilonPlusFlat(epsilon=epsilon, canonizers=canonizers)

    def run():
        x = s.inputs.detach().clone().requires_grad_(True)
        with composite.context(s.model) as model:
            logits = model(x)
            start = torch.zeros_like(logits)
            start[torch.arange(len(x)), s.targets] = 1.0
            (relevance,) = torch.autograd.grad(logits, x, grad_outputs=start * logits.detach())
        return relevance.detach()

    return run, lambda: None


PEERS: list[PeerMethod] = [
    PeerMethod("pytorch-grad-cam", "FullGrad", "fullgrad", _pgc_fullgrad, FULLGRAD_NOTE),
    PeerMethod("captum", "InputXGradient", "input_x_gradient", _captum("InputXGradient")),
    PeerMethod("zennit", "EpsilonPlusFlat / EpsilonGammaBox", "lrp", _zennit_lrp, LRP_NOTE),
]
CASES: list[tuple[str, dict]] = [
    ("fullgrad", {}), ("input_x_gradient", {}),
    ("lrp", {"composite": "epsilon_plus_flat"}), ("lrp", {"composite": "epsilon_gamma_box"}),
]


def randomize_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch-norm statistics and affine parameters, conv and linear biases away from torchvision's
    initialisation (where every bias folds to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=gen))
    return model


def run_agreement(models=("resnet18", "vgg16"), *, size: int = 112, batch: int = 2, repeats: int = 3,
                  methods=None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Our methods (``methods``: a subset of :data:`CASES`' names, default all) against the installed
    references on random-initialised torchvision nets."""
    import vislib

    libraries = installed_libraries()
    rows = []
    for name in models:
        torch.manual_seed(0)
        bundle = vislib.load_model(name, weights=None, device="cpu")
        randomize_biases(bundle.model)
        inputs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            targets = bundle.logits(inputs).argmax(dim=1)
        for method, options in CASES:
            if methods is not None and method not in methods:
                continue
            peer = next(p for p in PEERS if p.ours == method)
            row = {"model": name, "input": [3, size, size], "method": method, "options": options,
                   "library": peer.library, "peer": peer.peer_name, "note": peer.note}
            if peer.library not in libraries:
                rows.append({**row, "status": "skipped", "message": f"{peer.library} is not installed"})
                continue
            log(f"agreement {name}: {method} {options or ''} vs {peer.library}")
            try:
                row.update(compare(bundle, inputs, targets, method, options, peer, repeats))
            except Exception as exc:  # a reference failing is a result, not a crash
                row.update(status="error", message=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
    return {"threshold": REFERENCE_R, "libraries": libraries, "rows": rows}


def compare(bundle, inputs: torch.Tensor, targets: torch.Tensor, method: str, options: dict, peer: PeerMethod,
            repeats: int = 3) -> dict:
    """One row: our call timed paired with a forward pass, the reference's call, their Pearson r."""
    import vislib
    from benchmarks.measure import agreement, forward_reference, pair_ratio, time_call, time_paired

    batch, size = len(inputs), tuple(inputs.shape[-2:])

    def ours():
        return vislib.explain(bundle, inputs, methods=[method], target=targets.tolist(),
                              options={method: options})

    fwd, timing, out = time_paired(forward_reference(bundle.model, inputs), ours, device=bundle.device,
                                   batch=batch, repeats=repeats, warmup=1)
    defaults = dict(vislib.METHODS[method].defaults)
    setup = peer_setup(bundle.model, bundle.default_layer, inputs, targets, {**defaults, **options})
    run, close = peer.make(setup)
    try:
        theirs_timing, theirs = time_call(run, device=bundle.device, batch=batch, repeats=1, warmup=1)
    finally:
        close()
    r, compared = agreement(out.raw[method], out.maps[method], theirs, size)
    return {"status": "ok", "r": r, "compared": compared, "agrees": r is not None and r >= REFERENCE_R,
            "ours_per_image_s": timing.per_image, "x_forward": pair_ratio(fwd, timing),
            "forward_per_image_s": fwd.per_image, "theirs_per_image_s": theirs_timing.per_image}


def render(result: dict) -> list[str]:
    """Markdown lines: one row per (model, method, reference)."""
    lines = ["## Backprop family against its references (random-init nets, biases randomised)", "",
             "Pearson r per image between our raw output and the reference's "
             f"(target r ≥ {result['threshold']}).", "",
             "| model | input | method | reference | r | compared | ours ms/img | × fwd | theirs ms/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes: dict[str, int] = {}
    for row in result["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        method = row["method"] + (f" ({opts})" if opts else "")
        ref = f"{row['library']} {row['peer']}"
        if row.get("note"):
            ref += f" [{notes.setdefault(row['note'], len(notes) + 1)}]"
        size = "×".join(map(str, row["input"][1:]))
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {size} | {method} | {ref} | {row['status']}: "
                         f"{row['message'].replace('|', '/')} | | | | |")
            continue
        r = "–" if row["r"] is None else f"{row['r']:.6f}"
        lines.append(f"| {row['model']} | {size} | {method} | {ref} | {r} | {row['compared']} | "
                     f"{1000 * row['ours_per_image_s']:.1f} | {row['x_forward']:.2f}× | "
                     f"{1000 * row['theirs_per_image_s']:.1f} |")
    if notes:
        lines += [""] + [f"{n}. {text}" for text, n in notes.items()]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agreement_backprop",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,vgg16", help="comma-separated torchvision models")
    p.add_argument("--size", type=int, default=112, help="input side in pixels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="paired timed runs of ours after a warm-up")
    p.add_argument("--json", type=str, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    os.environ.setdefault("VISLIB_OFFLINE", "1")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    result = run_agreement([m for m in args.models.split(",") if m], size=args.size, batch=args.batch,
                           repeats=args.repeats, log=log)
    print("\n".join(render(result)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if all(r.get("agrees", True) for r in result["rows"] if r["status"] == "ok") else 1


if __name__ == "__main__":
    sys.exit(main())
