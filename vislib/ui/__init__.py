"""Pure helpers for the dashboard: no Streamlit in here, so all of it can be tested and timed alone.

The pages (``app.py``, ``pages/*``) are thin: widgets in, one call into this package, render out.
Its modules, each importing only the ones above it:

* :mod:`~vislib.ui.layers`: layer labels (grid and layout) and the walk through a network,
* :mod:`~vislib.ui.catalogues`: the method catalogue as the UI shows it (grouped by family, default
  view, which methods depend on the target layer) and the model catalogue (sources, search,
  refusals, weights, the model card, the offline note),
* :mod:`~vislib.ui.availability`: which methods apply to a model and layer, and why not,
* :mod:`~vislib.ui.state`: the page state that lives in the URL (parse and serialise
  ``st.query_params``) and cache keys (SHA-256 of the image bytes plus every parameter),
* :mod:`~vislib.ui.compute`: the computation of a whole view (several layers, errors isolated per
  family and per method) and a background job that reports progress and can be cancelled,
* :mod:`~vislib.ui.rendering`: overlays, signed-RGB views of input-space signals, colour bars, the
  top-k bar chart, panel captions, PNG/NPZ downloads,
* :mod:`~vislib.ui.samples`: the sample pictures,
* :mod:`~vislib.ui.targets_view`: what is explained beyond one softmax class: the chart's title per
  output kind, typed CLIP prompts, one row per label of a multi-label model, "why similar?".

Every public name is re-exported here (``from vislib import ui; ui.compute_view(...)``). A test
that patches a function used inside the package patches the module that looks it up (e.g.
``vislib.ui.compute.explain``), not this package.
"""

from .availability import ModelFacts, cam_head_possible, method_availability, model_facts
from .catalogues import (
    CATALOGUE_SOURCES,
    DEFAULT_METHODS,
    DISPLAY_FAMILY_ORDER,
    SCORES,
    SEARCH_LIMIT,
    SIGNAL_VIEWS,
    SLOW_METHODS,
    SOURCE_TITLES,
    UPLOAD_PREFIX,
    catalogue,
    dashboard_refusal,
    default_methods,
    display_order,
    family_title,
    is_slow,
    method_summary,
    method_title,
    methods_by_family,
    model_card,
    model_source,
    offline_note,
    search_models,
    uses_layer,
    weights_choices,
    weights_text,
)
from .compute import (
    BackgroundJob,
    LayerRow,
    ViewResult,
    compute_view,
    plan_rows,
    split_doomed,
    with_time_left,
)
from .layers import LAYOUT_WORDS, bundle_layer_label, forward_order, layer_label, walk_layers
from .rendering import (
    Panel,
    class_from_selection,
    colorbar,
    flat_notes,
    format_seconds,
    is_signal,
    maps_npz,
    panel_image,
    panels,
    render_all,
    safe_filename,
    topk_figure,
)
from .samples import generated_sample, sample_choices
from .state import ViewState, image_digest, parse_query, result_key, to_query
from .targets_view import (
    LabelRowsResult,
    SimilarityResult,
    chart_title,
    compare_images,
    label_rows,
    parse_prompts,
)

__all__ = [
    "BackgroundJob", "CATALOGUE_SOURCES", "DEFAULT_METHODS", "DISPLAY_FAMILY_ORDER", "LAYOUT_WORDS",
    "LayerRow", "ModelFacts", "Panel", "SCORES", "SEARCH_LIMIT", "SIGNAL_VIEWS", "SLOW_METHODS",
    "SOURCE_TITLES", "UPLOAD_PREFIX", "ViewResult", "ViewState", "bundle_layer_label", "cam_head_possible",
    "catalogue", "class_from_selection", "colorbar", "compute_view", "dashboard_refusal", "default_methods",
    "display_order", "family_title", "flat_notes", "format_seconds", "forward_order", "generated_sample",
    "image_digest",
    "is_signal", "is_slow", "layer_label", "maps_npz", "method_availability", "method_summary",
    "method_title", "methods_by_family", "model_card", "model_facts", "model_source", "offline_note",
    "panel_image", "panels", "parse_query", "plan_rows", "render_all", "result_key", "safe_filename",
    "sample_choices", "search_models", "split_doomed", "to_query", "topk_figure", "uses_layer",
    "walk_layers", "weights_choices", "weights_text", "with_time_left",
    "LabelRowsResult", "SimilarityResult", "chart_title", "compare_images", "label_rows", "parse_prompts",
]
