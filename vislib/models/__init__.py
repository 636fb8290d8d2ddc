"""Models: the registry, the bundle every source ends in, and one adapter module per source.

- :mod:`.bundle`: :class:`ModelBundle` (model, preprocessing, labels, layers as the methods see them,
  default layer, output selection) and :func:`make_bundle`, which probes a model once;
- :mod:`.registry`: ``register_model`` / ``list_models`` / ``load_model`` (names, or a user's module);
- :mod:`.weights`: state dicts read safely (``.safetensors``; ``.pt`` only with ``weights_only=True``);
- sources: :mod:`.bundled` (assets/models), :mod:`.torchvision_zoo`.
"""

from .bundle import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    LayerRow,
    ModelBundle,
    Preprocess,
    default_device,
    describe_output,
    make_bundle,
    select_output,
)
from .bundled import ASSETS, DEFAULT_MODEL, MODELS_DIR, read_card, sample_images  # noqa: F401, I001
from .probe import Probe, choose_default_layer, probe_model  # noqa: F401
from .registry import _REGISTRY, ModelSpec, list_models, load_model, model_spec, register_model  # noqa: F401
from .torchvision_zoo import (  # noqa: F401, I001  (sources register their models on import: after the registry)
    TORCHVISION_DEFAULT_LAYERS,
    pretrained_available,
    pretrained_cache_path,
)
from .weights import MAX_WEIGHTS_BYTES, check_state_dict, load_state_dict_file, read_state_dict  # noqa: F401
