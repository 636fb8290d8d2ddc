"""Models: the registry, the bundle every source ends in, and one adapter module per source.

- :mod:`.bundle`: :class:`ModelBundle` (model, preprocessing, labels, layers as the methods see them,
  default layer, output selection) and :func:`make_bundle`, which probes a model once;
- :mod:`.registry`: ``register_model`` / ``list_models`` / ``load_model`` (names, or a user's module);
- :mod:`.weights`: state dicts read safely (``.safetensors``; ``.pt`` only with ``weights_only=True``);
- :mod:`.source`: what every source builds (:class:`SourceModel`) and how it becomes a bundle;
  :mod:`.cache`: pretrained weights through the torch hub and Hugging Face caches;
- sources: :mod:`.bundled` (assets/models), :mod:`.torchvision_zoo` (every torchvision classifier),
  :mod:`.timm_zoo` (``timm:``), :mod:`.huggingface` (``hf:``), :mod:`.factory` (``module:callable``
  and ``nn.Module`` objects), :mod:`.specfile` (TOML spec files).
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
from .embedding import as_embedding, shallow_clone  # noqa: F401
from .probe import Probe, choose_default_layer, probe_model  # noqa: F401
from .registry import (  # noqa: F401
    _REGISTRY,
    ModelRef,
    ModelSpec,
    list_models,
    load_model,
    model_ref,
    model_spec,
    pretrained_available,
    register_model,
)
from .source import SourceModel, scheme_of  # noqa: F401, I001
from .specfile import (  # noqa: F401, I001
    SpecFileReport,
    read_spec_file,
    read_spec_tables,
    register_models,
    register_spec_files,
    spec_files_from_env,
    unregister_models,
)
from .torchvision_zoo import TORCHVISION_DEFAULT_LAYERS, pretrained_cache_path  # noqa: F401, I001  (registers)
from .weights import MAX_WEIGHTS_BYTES, check_state_dict, load_state_dict_file, read_state_dict  # noqa: F401
