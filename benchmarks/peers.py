"""The established libraries, called the way their documentation shows, mapped to vislib's names.

Each adapter gets its own deep copy of the model (pytorch-grad-cam calls ``.backward()`` and swaps
modules; those side effects must not reach the model vislib is timed on) and returns a ``run``
callable producing the library's output for the whole batch, plus a ``close`` that removes its hooks.
Known disagreements are stated in ``PeerMethod.note``: which side follows the paper, and why.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vislib._optional import require

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam prints tqdm bars in its perturbation loops

# library -> (import name, pip distribution)
LIBRARIES = {
    "pytorch-grad-cam": ("pytorch_grad_cam", "grad-cam"),
    "torchcam": ("torchcam", "torchcam"),
    "captum": ("captum", "captum"),
    "zennit": ("zennit", "zennit"),
}


def installed_libraries() -> dict[str, str]:
    """The peer libraries importable here, with their versions."""
    found = {}
    for library, (module, dist) in LIBRARIES.items():
        if importlib.util.find_spec(module) is not None:
            try:
                found[library] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[library] = "unknown"
    return found


@dataclass
class PeerSetup:
    """What a peer needs: its own model copy, the layer name, the batch and the targets."""

    model: nn.Module
    layer: str
    inputs: torch.Tensor
    targets: torch.Tensor
    options: dict = field(default_factory=dict)  # our method's effective options, mirrored where possible

    @property
    def module(self) -> nn.Module:
        return self.model.get_submodule(self.layer)


Adapter = Callable[[PeerSetup], tuple[Callable[[], torch.Tensor], Callable[[], None]]]


def one_pass(_s: PeerSetup) -> tuple[int, str]:
    return 1, "forward_backward"


@dataclass(frozen=True)
class PeerMethod:
    """One peer implementation of one of our methods. ``passes(setup)`` = (passes per image, kind):
    the cost model that lets the benchmark skip a peer it can predict to be over the row budget
    (a peer call cannot be interrupted)."""

    library: str
    peer_name: str
    ours: str
    make: Adapter
    note: str = ""
    passes: Callable[[PeerSetup], tuple[int, str]] = one_pass
    differs: str = ""  # how the peer's definition differs from our default (its ρ then says so)


def _channel_passes(s: PeerSetup) -> tuple[int, str]:
    seen = {}

    def hook(_module, _inputs, output) -> None:
        seen["c"] = output.shape[1]

    with torch.no_grad():
        handle = s.module.register_forward_hook(hook)
        try:
            s.model(s.inputs[:1])
        finally:
            handle.remove()
    return int(seen["c"]), "forward"


def _occlusion_passes(s: PeerSetup) -> tuple[int, str]:
    kw = _occlusion_kwargs(s)
    h, w = s.inputs.shape[-2:]
    _, ph, pw = kw["sliding_window_shapes"]
    _, sh, sw = kw["strides"]
    return ((h - ph) // sh + 1) * ((w - pw) // sw + 1), "forward"


def _no_close() -> None:
    return None


# --------------------------------------------------------------------------------------------------
# pytorch-grad-cam (pip grad-cam)


def _pgc_cam(class_name: str, **kwargs) -> Adapter:
    def make(s: PeerSetup):
        pytorch_grad_cam = require("pytorch_grad_cam", "bench")
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = getattr(pytorch_grad_cam, class_name)(model=s.model, target_layers=[s.module], **kwargs)
        targets = [ClassifierOutputTarget(int(t)) for t in s.targets]

        def run():
            return torch.from_numpy(cam(input_tensor=s.inputs, targets=targets))  # N×H×W in [0, 1]

        return run, cam.activations_and_grads.release

    return make


def _pgc_guided_backprop(s: PeerSetup):
    GuidedBackpropReLUModel = require("pytorch_grad_cam", "bench").GuidedBackpropReLUModel

    guided = GuidedBackpropReLUModel(s.model, device=s.inputs.device)

    def run():  # one image per call: the class handles a single image
        outs = [guided(s.inputs[i : i + 1].clone(), target_category=int(t)) for i, t in enumerate(s.targets)]
        return torch.stack([torch.from_numpy(o).permute(2, 0, 1) for o in outs])

    return run, _no_close


# --------------------------------------------------------------------------------------------------
# torchcam


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1]


def _torchcam(class_name: str, *, gradient: bool = True, **kwargs) -> Adapter:
    def make(s: PeerSetup):
        methods = require("torchcam.methods", "bench")

        extra = dict(kwargs)
        if class_name == "CAM":
            extra["fc_layer"] = _last_linear(s.model)
        extractor = getattr(methods, class_name)(
            s.model, target_layer=s.layer, input_shape=tuple(s.inputs.shape[1:]), **extra
        )
        class_idx = [int(t) for t in s.targets]

        def run():
            with torch.set_grad_enabled(gradient):
                scores = s.model(s.inputs)
            return extractor(class_idx=class_idx, scores=scores)[0].detach()  # N×h×w in [0, 1]

        return run, extractor.remove_hooks

    return make


def _torchcam_smoothed(class_name: str) -> Adapter:
    """torch-cam's SSCAM / ISCAM with our options mirrored (n_samples, sigma, batch_size); SS-CAM draws
    its noise from the global generator, seeded with our ``seed`` right before the call: the same
    noise as ours when H·W is a multiple of 16 (see vislib.methods.scorecam.NoiseRows)."""

    def make(s: PeerSetup):
        methods = require("torchcam.methods", "bench")

        kwargs = {"batch_size": int(s.options.get("batch_size", 32))}
        if class_name == "SSCAM":
            kwargs["num_samples"] = int(s.options.get("n_samples", 35))
            kwargs["std"] = float(s.options.get("sigma", 2.0))
        else:
            kwargs["num_samples"] = int(s.options.get("n_samples", 10))
        extractor = getattr(methods, class_name)(s.model, target_layer=s.layer,
                                                 input_shape=tuple(s.inputs.shape[1:]), **kwargs)
        class_idx = [int(t) for t in s.targets]
        seed = int(s.options.get("seed", 0))

        def run():
            with torch.no_grad():
                scores = s.model(s.inputs)
            torch.manual_seed(seed)
            return extractor(class_idx=class_idx, scores=scores)[0].detach()

        return run, extractor.remove_hooks

    return make


def _smoothed_passes(default_n: int) -> Callable[[PeerSetup], tuple[int, str]]:
    def passes(s: PeerSetup) -> tuple[int, str]:
        channels, kind = _channel_passes(s)
        return channels * int(s.options.get("n_samples", default_n)), kind

    return passes


# --------------------------------------------------------------------------------------------------
# Captum


def _captum(class_name: str, *, layer: bool = False, kwargs_from: Callable[[PeerSetup], dict] | None = None):
    def make(s: PeerSetup):
        attr = require("captum.attr", "bench")

        cls = getattr(attr, class_name)
        method = cls(s.model, s.module) if layer else cls(s.model)
        kwargs = kwargs_from(s) if kwargs_from else {}

        def run():
            with warnings.catch_warnings():  # "Input Tensor 0 did not already require gradients"
                warnings.simplefilter("ignore", UserWarning)
                return method.attribute(s.inputs, target=s.targets, **kwargs).detach()

        return run, _no_close

    return make


def _captum_smoothgrad(s: PeerSetup):
    attr = require("captum.attr", "bench")

    tunnel = attr.NoiseTunnel(attr.Saliency(s.model))
    modes = {"mean": "smoothgrad", "square": "smoothgrad_sq", "var": "vargrad"}  # our mode → Captum's
    nt_type = modes[s.options.get("mode", "mean")]
    n = int(s.options.get("n_samples", 50))
    level = float(s.options.get("level", 0.15))
    # σ = level·(max − min) of each input in the normalised space; Captum takes one σ per input
    # tensor, so a batch gets the mean of its samples' ranges
    flat = s.inputs.flatten(1)
    span = float((flat.amax(dim=1) - flat.amin(dim=1)).mean())
    per_chunk = max(1, 16 // s.inputs.shape[0])

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return tunnel.attribute(
                s.inputs, nt_type=nt_type, nt_samples=n, stdevs=level * span, target=s.targets,
                nt_samples_batch_size=per_chunk, abs=False,
            ).detach()

    return run, _no_close


def _number(value, what: str) -> float:
    if value in ("zeros", None):
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"the peer cannot mirror {what}={value!r}")


def _ig_kwargs(s: PeerSetup) -> dict:
    """Same quadrature as ours: Gauss–Legendre with our number of steps, zero baseline."""
    return {
        "n_steps": int(s.options.get("steps", 32)),
        "baselines": _number(s.options.get("baseline", "zeros"), "baseline"),
        "method": "gausslegendre",
        "internal_batch_size": int(s.options.get("batch_size", 16)),
    }


def _occlusion_kwargs(s: PeerSetup) -> dict:
    """Our default window (side/7), stride (window/2) and fill (0 in the normalised space)."""
    side = min(s.inputs.shape[-2:])
    patch = int(s.options.get("patch", max(1, side // 7)))
    stride = int(s.options.get("stride", max(1, patch // 2)))
    channels = s.inputs.shape[1]
    return {
        "sliding_window_shapes": (channels, patch, patch),
        "strides": (channels, stride, stride),
        "baselines": _number(s.options.get("fill", 0.0), "fill"),
        "perturbations_per_eval": int(s.options.get("batch_size", 32)),
    }


# --------------------------------------------------------------------------------------------------
# The map from our names to theirs

GRADCAMPP_PGC = (
    "adds an absolute eps=1e-6 to the denominator of a_ij = g²/(2g² + ΣA·g³); at deep layers g ~ 1e-4, "
    "so g² ~ 1e-8 ≪ eps and the weights become ~relu(g)³/eps instead of Grad-CAM++ (eq. 19). "
    "The paper-formula column says which map follows the paper."
)
GRADCAMPP_TORCHCAM = (
    "divides alpha through a boolean-indexed copy (alpha[mask].div_(...)): the division is a no-op, "
    "so the weights are Σ g²·relu(g) without the paper's denominator."
)
SCORECAM_NOTE = (
    "Score-CAM (Wang et al. 2020, Alg. 1) weights channel k by softmax over channels of the class score "
    "of x ⊙ norm(up(A^k)); the authors' code instead uses the softmax over classes (a probability) and "
    "no channel softmax. The softmax over channels is shift-invariant, so subtracting the clean score "
    "(torchcam) changes nothing. The two peers differ in the upsampling of A^k: pytorch-grad-cam uses "
    "align_corners=True (nn.UpsamplingBilinear2d), torchcam, the authors' code and vislib's default use "
    "False; vislib with the option align_corners=True reproduces pytorch-grad-cam's map (ρ = 1.0000 measured "
    "on resnet18 at 64 px)."
)
SMOOTHED_NOTE = (
    "torch-cam min-maxes A^k at feature resolution before upsampling (ours: after, as our Score-CAM) and "
    "subtracts the clean score before averaging (the channel softmax does not see it); SS-CAM runs with "
    "our seed, so both draw the same noise."
)
EIGENCAM_PGC = (
    "centres the activations before the SVD (the paper projects A itself) and does not fix the SVD's "
    "arbitrary sign, so its map can be the negative of the principal direction (then its ReLU keeps "
    "the wrong half)."
)
ABLATION_PGC = "same formula (S − S_k)/S; it ablates all channels through a module swapped into the model."
GUIDED_PGC = "swaps nn.ReLU modules for a guided ReLU (functional F.relu calls keep plain gradients)."
SALIENCY_NOTE = "called with abs=False: the signed gradient (Simonyan et al. 2014 display |∂S/∂x|)."
GUIDED_GRADCAM_NOTE = (
    "called with interpolate_mode='bilinear' (Captum's default is nearest; the paper upsamples bilinearly)."
)
SMOOTHGRAD_NOTE = "random noise differs between libraries: agreement grows with the number of samples."
OCCLUSION_NOTE = (
    "Captum spreads each window's score drop over its pixels and averages overlapping windows; compared as "
    "maps at the input size."
)

PEER_METHODS: list[PeerMethod] = [
    # pytorch-grad-cam
    PeerMethod("pytorch-grad-cam", "GradCAM", "gradcam", _pgc_cam("GradCAM")),
    PeerMethod("pytorch-grad-cam", "GradCAMPlusPlus", "gradcam++", _pgc_cam("GradCAMPlusPlus"),
               GRADCAMPP_PGC),
    PeerMethod("pytorch-grad-cam", "XGradCAM", "xgradcam", _pgc_cam("XGradCAM")),
    PeerMethod("pytorch-grad-cam", "LayerCAM", "layercam", _pgc_cam("LayerCAM")),
    PeerMethod("pytorch-grad-cam", "HiResCAM", "hirescam", _pgc_cam("HiResCAM")),
    PeerMethod("pytorch-grad-cam", "ScoreCAM", "scorecam", _pgc_cam("ScoreCAM"), SCORECAM_NOTE,
               _channel_passes, differs="align_corners=True upsampling"),
    PeerMethod("pytorch-grad-cam", "AblationCAM", "ablationcam", _pgc_cam("AblationCAM"), ABLATION_PGC,
               _channel_passes),
    PeerMethod("pytorch-grad-cam", "EigenCAM", "eigencam", _pgc_cam("EigenCAM"), EIGENCAM_PGC),
    PeerMethod("pytorch-grad-cam", "GuidedBackpropReLUModel", "guided_backprop", _pgc_guided_backprop,
               GUIDED_PGC),
    # torchcam
    PeerMethod("torchcam", "CAM", "cam", _torchcam("CAM", gradient=False)),
    PeerMethod("torchcam", "GradCAM", "gradcam", _torchcam("GradCAM")),
    PeerMethod("torchcam", "GradCAMpp", "gradcam++", _torchcam("GradCAMpp"), GRADCAMPP_TORCHCAM),
    PeerMethod("torchcam", "XGradCAM", "xgradcam", _torchcam("XGradCAM")),
    PeerMethod("torchcam", "LayerCAM", "layercam", _torchcam("LayerCAM")),
    PeerMethod("torchcam", "ScoreCAM", "scorecam", _torchcam("ScoreCAM", gradient=False), SCORECAM_NOTE,
               _channel_passes),
    PeerMethod("torchcam", "SSCAM", "sscam", _torchcam_smoothed("SSCAM"), SMOOTHED_NOTE,
               _smoothed_passes(35)),
    PeerMethod("torchcam", "ISCAM", "iscam", _torchcam_smoothed("ISCAM"), SMOOTHED_NOTE,
               _smoothed_passes(10)),
    # Captum
    PeerMethod("captum", "LayerGradCam", "gradcam",
               _captum("LayerGradCam", layer=True, kwargs_from=lambda s: {"relu_attributions": True})),
    PeerMethod("captum", "Saliency", "gradient", _captum("Saliency", kwargs_from=lambda s: {"abs": False}),
               SALIENCY_NOTE),
    PeerMethod("captum", "Deconvolution", "deconvnet", _captum("Deconvolution")),
    PeerMethod("captum", "GuidedBackprop", "guided_backprop", _captum("GuidedBackprop")),
    PeerMethod("captum", "GuidedGradCam", "guided_gradcam",
               _captum("GuidedGradCam", layer=True, kwargs_from=lambda s: {"interpolate_mode": "bilinear"}),
               GUIDED_GRADCAM_NOTE),
    PeerMethod("captum", "NoiseTunnel(Saliency, smoothgrad)", "smoothgrad", _captum_smoothgrad,
               SMOOTHGRAD_NOTE, lambda s: (int(s.options.get("n_samples", 50)), "forward_backward")),
    PeerMethod("captum", "IntegratedGradients", "integrated_gradients",
               _captum("IntegratedGradients", kwargs_from=_ig_kwargs), "",
               lambda s: (int(s.options.get("steps", 32)), "forward_backward")),
    PeerMethod("captum", "Occlusion", "occlusion", _captum("Occlusion", kwargs_from=_occlusion_kwargs),
               OCCLUSION_NOTE, _occlusion_passes),
]


def peers_for(method: str, libraries: dict[str, str] | None = None) -> list[PeerMethod]:
    """The installed peers' implementations of one of our methods."""
    from .agreement_backprop import PEERS as BACKPROP_PEERS  # FullGrad, Input × Gradient, LRP

    libraries = installed_libraries() if libraries is None else libraries
    return [p for p in PEER_METHODS + BACKPROP_PEERS if p.ours == method and p.library in libraries]


def peer_setup(model: nn.Module, layer: str, inputs: torch.Tensor, targets: torch.Tensor, options=None):
    """A setup with a private copy of ``model`` (same weights), so the peer cannot touch ours."""
    return PeerSetup(copy.deepcopy(model).eval(), layer, inputs, targets, dict(options or {}))
