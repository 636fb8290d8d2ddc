"""vislib: see what a convolutional network sees.

Public API::

    import vislib
    vislib.list_models()
    bundle = vislib.load_model("shapes_resnet")          # or "resnet50", weights="default" | None | path
    vislib.load_model("timm:convnext_tiny"), vislib.load_model("hf:google/vit-base-patch16-224")
    vislib.register_models("models.toml")               # spec files: [models.NAME] tables
    image = vislib.load_image("photo.jpg")
    result = vislib.explain(bundle, image, methods=["gradcam", "gradcam++"])
    result.maps["gradcam"]   # H×W float32 in [0, 1] at the model's input resolution
    vislib.explain(bundle, image, target=vislib.Label("dog", score="probability"))   # what to explain
"""

from ._version import __version__
from .concepts import Concepts, concepts  # noqa: F401
from .errors import (  # noqa: F401
    Cancelled,
    InputError,
    LayerError,
    MethodError,
    ModelError,
    TargetError,
    VislibError,
    WeightsError,
)
from .explain import Explanation, explain  # noqa: F401
from .imageio import load_image  # noqa: F401
from .methods import METHODS, method_names  # noqa: F401
from .methods.sharing import PassCache  # noqa: F401
from .models import (  # noqa: F401
    ModelBundle,
    ModelRef,
    Preprocess,
    list_models,
    load_model,
    model_ref,
    register_models,
    sample_images,
)
from .models.embedding import as_embedding  # noqa: F401
from .multilabel import LabelExplanations, explain_labels  # noqa: F401
from .render import overlay, to_png_bytes  # noqa: F401
from .targets import Class, Label, Regression, Similarity, Target, Text, resolve_target  # noqa: F401

__all__ = [
    "__version__",
    "explain", "Explanation", "PassCache", "concepts", "Concepts", "load_image", "load_model", "list_models",
    "register_models", "model_ref", "ModelRef", "METHODS", "method_names",
    "ModelBundle", "Preprocess", "sample_images", "overlay", "to_png_bytes", "VislibError",
    "InputError", "LayerError", "MethodError", "ModelError", "TargetError", "WeightsError", "Cancelled",
    "evaluate", "Target", "Class", "Label", "Regression", "Similarity", "Text", "resolve_target",
    "as_embedding", "explain_labels", "LabelExplanations",
]

# a callable module: vislib.evaluate(bundle, images, ...) is vislib.evaluate.evaluate
from . import evaluate  # noqa: E402
