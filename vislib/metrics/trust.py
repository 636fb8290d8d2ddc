"""Can I trust this map? Every metric beside a random map, the image centre and a bootstrap interval.

Metrics disagree with each other (Hedström et al. 2023, MetaQuantus) and a lone number means little,
so each figure comes with:

- the same metric on a **random map** (uniform noise; Quantus's README asks for this control). For
  the robustness metrics the noise is drawn afresh at every call (a method should be steadier than
  noise); for the randomisation metrics it is one fixed map per image whatever the model or class (a
  map that ignores the model, which those tests exist to catch);
- the **image-centre** map (:func:`centre_map`) for the localisation metrics;
- a **bootstrap 95 % interval** of the mean over images (percentile, ``n_boot`` resamples), and
  whether the method **beats the random map**: the paired bootstrap interval of the mean difference
  lies wholly on the better side.

:func:`evaluate_trust` returns plain :class:`TrustRow` rows; :func:`rank_agreement` says how far the
metrics agree on the ranking of the methods (Kendall τ_b, Spearman ρ).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import VislibError
from .base import Metric, as_maps
from .complexity import Complexity, Sparseness
from .faithfulness import ROAD, FaithfulnessCorrelation, PixelFlipping, RegionPerturbation
from .localisation import EnergyPointingGame, PointingGame, RelevanceMass, RelevanceRankAccuracy, centre_map
from .randomisation import MPRT, RandomLogit, SmoothMPRT
from .robustness import AvgSensitivity, MaxSensitivity
from .similarity import spearman


class MetricError(VislibError, ValueError):
    """An unknown metric name or a metric that cannot run on what was given."""


# name → factory (settings: the paper's defaults; keyword overrides)
METRICS: dict[str, Callable[..., Metric]] = {
    "road_morf": lambda **kw: ROAD(order="morf", **kw),
    "road_lerf": lambda **kw: ROAD(order="lerf", **kw),
    "faithfulness_correlation": FaithfulnessCorrelation,
    "pixel_flipping": PixelFlipping,
    "region_perturbation": RegionPerturbation,
    "max_sensitivity": MaxSensitivity,
    "avg_sensitivity": AvgSensitivity,
    "mprt": MPRT,
    "smooth_mprt": SmoothMPRT,
    "random_logit": RandomLogit,
    "sparseness": Sparseness,
    "complexity": Complexity,
    "pointing_game": PointingGame,
    "energy_pointing_game": EnergyPointingGame,
    "relevance_mass": RelevanceMass,
    "relevance_rank_accuracy": RelevanceRankAccuracy,
}
ALIASES = {"road": ("road_morf", "road_lerf")}
# cheap enough for the dashboard's on-demand panel (a few forwards per image, no re-explaining)
FAST = ("road_morf", "road_lerf", "faithfulness_correlation", "region_perturbation", "random_logit",
        "sparseness", "complexity")
LOCALISATION = ("pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank_accuracy")
RANDOM = "random map"
CENTRE = "image centre"


def parse_metrics(names: str | Sequence[str]) -> list[str]:
    """Metric names from ``"road,faithfulness_correlation"`` or a list; ``road`` is both orders,
    ``fast`` the dashboard's set, ``all`` every metric. Unknown names raise :class:`MetricError`."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    out: list[str] = []
    for item in items:
        key = item.lower().replace("-", "_")
        expanded = (list(METRICS) if key == "all" else FAST if key == "fast"
                    else ALIASES.get(key, (key,)))
        for name in expanded:
            if name not in METRICS:
                close = difflib.get_close_matches(name, [*METRICS, *ALIASES], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise MetricError(f"unknown metric {item!r}{hint}; known: {', '.join([*METRICS, *ALIASES])}")
            if name not in out:
                out.append(name)
    if not out:
        raise MetricError("no metric given")
    return out


def make_metric(name: str, **settings) -> Metric:
    return METRICS[parse_metrics([name])[0]](**settings)


def metric_key(metric: Metric) -> str:
    """The registry name of a metric object (ROAD carries its order: ``road_morf`` / ``road_lerf``)."""
    return f"road_{metric.order}" if isinstance(metric, ROAD) else metric.name


# --------------------------------------------------------------------------------------------------
# Baselines and intervals


def random_maps(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``count`` uniform random H×W maps in [0, 1) (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count, height, width), generator=generator, dtype=torch.float64)


def random_explainer(seed: int = 0, *, fresh: bool = True):
    """An ``explain`` that ignores the model: uniform noise, drawn afresh at every call (``fresh``)
    or the same maps for the same number and size of inputs (a map that ignores model and class)."""
    generator = torch.Generator().manual_seed(seed)

    def explain(model, inputs, classes):
        n, _, h, w = inputs.shape
        if fresh:
            return torch.rand((n, h, w), generator=generator, dtype=torch.float64)
        return random_maps(n, h, w, seed)

    return explain


def bootstrap_interval(values, *, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs left out): resample the images
    with replacement ``n_boot`` times. One value gives (v, v); none gives (NaN, NaN)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def beats(values, baseline, higher_is_better: bool, *, n_boot: int = 1000, seed: int = 0) -> bool:
    """Whether ``values`` beat ``baseline`` image for image: the bootstrap interval of the mean paired
    difference lies wholly on the better side (with one image: the difference does)."""
    d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
    d = d if higher_is_better else -d
    lo, _ = bootstrap_interval(d, n_boot=n_boot, seed=seed)
    return bool(np.isfinite(lo) and lo > 0)


@dataclass
class TrustRow:
    """One method under one metric: the mean over images with its interval, the random map's mean
    and interval, the image centre's (localisation only), and whether the method beats the random map."""

    method: str
    metric: str
    group: str
    higher_is_better: bool
    value: float
    low: float
    high: float
    random: float
    random_low: float
    random_high: float
    centre: float = math.nan
    beats_random: bool = False
    images: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrustReport:
    """Rows (method × metric) and the per-image values they summarise (``values[method][metric]``,
    the random map under :data:`RANDOM`, the centre under :data:`CENTRE`)."""

    rows: list[TrustRow]
    values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)

    def table(self) -> list[dict]:
        return [r.as_dict() for r in self.rows]


def evaluate_trust(model, inputs: torch.Tensor, targets, maps: Mapping[str, object],
                   metrics: Sequence[str | Metric], *, masks=None,
                   explainers: dict[str, Callable] | None = None, seed: int = 0,
                   n_boot: int = 1000, progress: Callable[[int, int], None] | None = None,
                   cancel=None) -> TrustReport:
    """Every metric for every method's ``maps`` (method → N×H×W) on ``inputs``, beside the random map
    (and the image centre for localisation), with bootstrap intervals.

    ``explainers[method]``: the method as ``explain(model, inputs, classes)`` for the metrics that
    re-explain (robustness, randomisation); a method without one skips them (NaN row). Localisation
    metrics are skipped without ``masks``. ``progress(done, total)`` counts metric × map runs;
    ``cancel`` (a ``threading.Event``) stops between and inside them.
    """
    import time

    explainers = explainers or {}
    n, _, h, w = inputs.shape
    chosen = [make_metric(m, seed=seed) if isinstance(m, str) else m for m in metrics]
    rand = random_maps(n, h, w, seed)
    centre = torch.from_numpy(centre_map(h, w)).double().expand(n, h, w)
    report = TrustReport(rows=[], values={RANDOM: {}, CENTRE: {}, **{m: {} for m in maps}})
    runs = [(metric, name) for metric in chosen for name in [RANDOM, *maps]]
    total, done = len(runs), 0
    seconds: dict[tuple[str, str], float] = {}
    for metric in chosen:
        report.settings[metric_key(metric)] = metric.settings()
    for metric, name in runs:
        key = metric_key(metric)
        skip = (metric.needs_masks and masks is None)
        explain = None
        if metric.needs_explain:
            explain = (random_explainer(seed, fresh=metric.group == "robustness") if name == RANDOM
                       else explainers.get(name))
            skip = skip or explain is None
        t0 = time.perf_counter()
        if skip:
            values = np.full(n, np.nan)
        else:
            m = rand if name == RANDOM else as_maps(maps[name], n)
            values = metric(model, inputs, targets, m, masks=masks, explain=explain, cancel=cancel)
            values = np.asarray(values, np.float64)
        report.values[name][key] = values
        if name == RANDOM and metric.centre_applies and not skip:
            at_centre = metric(model, inputs, targets, centre, masks=masks)
            report.values[CENTRE][key] = np.asarray(at_centre, np.float64)
        seconds[name, key] = time.perf_counter() - t0
        done += 1
        if progress is not None:
            progress(done, total)
    summary = summarise(report.values, list(maps), n_boot=n_boot, seed=seed, seconds=seconds)
    report.rows = summary.rows
    return report


def summarise(values: dict[str, dict[str, np.ndarray]], methods: Sequence[str], *, random: str = RANDOM,
              centre: str = CENTRE, n_boot: int = 1000, seed: int = 0,
              seconds: dict | None = None) -> TrustReport:
    """Rows from per-image values (``values[method or baseline][metric]``): each method's mean and
    bootstrap interval beside the random map's (``values[random]``) and the centre's, and whether it
    beats the random map."""
    rows = []
    for name in methods:
        for key, v in values.get(name, {}).items():
            metric = make_metric(key)
            hib = bool(metric.higher_is_better)
            v = np.asarray(v, np.float64)
            base = np.asarray(values.get(random, {}).get(key, np.full(len(v), np.nan)), np.float64)
            lo, hi = bootstrap_interval(v, n_boot=n_boot, seed=seed)
            rlo, rhi = bootstrap_interval(base, n_boot=n_boot, seed=seed)
            rows.append(TrustRow(
                method=name, metric=key, group=metric.group, higher_is_better=hib,
                value=_nanmean(v), low=lo, high=hi, random=_nanmean(base), random_low=rlo, random_high=rhi,
                centre=_nanmean(values.get(centre, {}).get(key, [])),
                beats_random=beats(v, base, hib, n_boot=n_boot, seed=seed), images=int(np.isfinite(v).sum()),
                seconds=(seconds or {}).get((name, key), 0.0)))
    return TrustReport(rows=rows, values=values)


def _nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


# --------------------------------------------------------------------------------------------------
# Do the metrics agree on which method is best?


def kendall_tau(a, b) -> float:
    """Kendall τ_b of two score vectors (ties corrected; NaN when either is constant)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    den = math.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return float((dx * dy).sum() / den) if den > 0 else math.nan


def method_scores(rows: Sequence[TrustRow]) -> dict[str, dict[str, float]]:
    """metric → method → its mean, signed so that higher is better for every metric."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r.metric, {})[r.method] = r.value if r.higher_is_better else -r.value
    return out


def rank_agreement(rows: Sequence[TrustRow], kind: str = "kendall") -> dict[str, dict[str, float]]:
    """metric × metric agreement on the ranking of the methods (Kendall τ_b or Spearman ρ of the
    better-is-higher scores), over the methods both scored; NaN with fewer than two methods."""
    scores = method_scores(rows)
    names = list(scores)
    out: dict[str, dict[str, float]] = {a: {} for a in names}
    for a in names:
        for b in names:
            common = [m for m in scores[a]
                      if m in scores[b] and np.isfinite(scores[a][m]) and np.isfinite(scores[b][m])]
            if len(common) < 2:
                out[a][b] = math.nan
                continue
            va, vb = [scores[a][m] for m in common], [scores[b][m] for m in common]
            out[a][b] = kendall_tau(va, vb) if kind == "kendall" else spearman(va, vb)
    return out


# --------------------------------------------------------------------------------------------------
# vislib's methods as explain functions


def explainer(method: str, layer: str | None = None, *, score: str = "logit", options: dict | None = None,
              cancel=None) -> Callable:
    """``explain(bundle, inputs, classes) -> N×H×W`` maps of a vislib method (its [0, 1] maps), for
    the metrics that re-explain; works on the randomised copies of :class:`MPRT` too."""

    def run(bundle, inputs, classes):
        from ..explain import explain

        result = explain(bundle, inputs, [method], layer, target=[int(c) for c in classes], score=score,
                         options={method: options} if options else None, cancel=cancel)
        return torch.as_tensor(np.asarray(result.maps[method])).reshape(inputs.shape[0], *inputs.shape[-2:])

    return run


# --------------------------------------------------------------------------------------------------
# An explanation's maps, and the rows as text / CSV


def trust_for_explanation(bundle, result, metrics: Sequence[str | Metric], *, masks=None, seed: int = 0,
                          progress: Callable[[int, int], None] | None = None, cancel=None) -> TrustReport:
    """:func:`evaluate_trust` for the maps of a :class:`vislib.Explanation` (one image or a batch)."""
    return trust_for_explanations(bundle, {m: result for m in result.methods}, metrics, masks=masks,
                                  seed=seed, progress=progress, cancel=cancel)


def trust_for_explanations(bundle, explanations: dict, metrics: Sequence[str | Metric], *, masks=None,
                           seed: int = 0, progress: Callable[[int, int], None] | None = None,
                           cancel=None) -> TrustReport:
    """:func:`evaluate_trust` for ``explanations`` (method → the :class:`vislib.Explanation` holding its
    map, e.g. the Explain page's): the inputs rebuilt from the first one's input views, its targets,
    each method re-explained by :func:`explainer` at its own layer where a metric needs it."""
    from ..models import Preprocess

    first = next(iter(explanations.values()))
    views = first.input_image if isinstance(first.input_image, list) else [first.input_image]
    inputs = bundle.to_input(views) if isinstance(bundle.preprocess, Preprocess) else bundle.prepare(views)[0]
    targets = np.atleast_1d(np.asarray(first.target, np.int64))
    n, _, h, w = inputs.shape
    maps = {m: np.asarray(e.maps[m], np.float64).reshape(n, h, w) for m, e in explanations.items()}
    explainers = {m: explainer(m, e.layer, score=e.score, cancel=cancel) for m, e in explanations.items()}
    return evaluate_trust(bundle, inputs, targets, maps, metrics, masks=masks, explainers=explainers,
                          seed=seed, progress=progress, cancel=cancel)


def _fmt(v: float) -> str:
    return "—" if not np.isfinite(v) else f"{v:.3f}"


def format_table(report: TrustReport) -> str:
    """The rows as an aligned text table: value [interval], the random map's, the centre's, and
    "does not beat random" where so."""
    lines = [f"{'method':<16} {'metric':<26} {'better':<6} {'value [95% CI]':<26} {'random map':<26} "
             f"{'centre':<8} verdict"]
    for r in report.rows:
        ci = f"{_fmt(r.value)} [{_fmt(r.low)}, {_fmt(r.high)}]" if r.images > 1 else _fmt(r.value)
        rci = (f"{_fmt(r.random)} [{_fmt(r.random_low)}, {_fmt(r.random_high)}]" if r.images > 1
               else _fmt(r.random))
        verdict = "no value" if not np.isfinite(r.value) else \
            "beats random" if r.beats_random else "does not beat the random map"
        lines.append(f"{r.method:<16} {r.metric:<26} {'higher' if r.higher_is_better else 'lower':<6} "
                     f"{ci:<26} {rci:<26} {_fmt(r.centre):<8} {verdict}")
    return "\n".join(lines)


def write_csv(report: TrustReport, path) -> None:
    """The rows as CSV (one per method and metric)."""
    import csv

    rows = report.table()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(TrustRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------------
# Tables for people (the dashboard and the report)

TITLES = {
    "road_morf": "ROAD MoRF", "road_lerf": "ROAD LeRF",
    "faithfulness_correlation": "Faithfulness Correlation",
    "pixel_flipping": "Pixel-Flipping", "region_perturbation": "Region Perturbation (AOPC)",
    "max_sensitivity": "Max-Sensitivity", "avg_sensitivity": "Avg-Sensitivity", "mprt": "MPRT",
    "smooth_mprt": "Smooth MPRT", "random_logit": "Random Logit", "sparseness": "Sparseness (Gini)",
    "complexity": "Complexity (entropy)", "pointing_game": "Pointing game", "energy_pointing_game":
    "Energy pointing game", "relevance_mass": "Relevance mass", "relevance_rank_accuracy": "Relevance rank",
}
#: no forward at all, so free beside an evaluation: the Error analysis page's default choice (ROAD
#: adds 9 forwards and imputations per image and method, Faithfulness Correlation 100)
DATASET_DEFAULT = ("sparseness", "complexity", "relevance_mass")


def display_rows(report: TrustReport, title: Callable[[str], str] = str) -> list[dict]:
    """One row per method and metric, formatted: value with its interval, the random map's, the centre's
    (localisation), and the verdict against the random map."""
    out = []
    for r in report.rows:
        interval = f"[{_fmt(r.low)}, {_fmt(r.high)}]" if r.images > 1 else "one image"
        out.append({
            "method": title(r.method), "metric": TITLES.get(r.metric, r.metric),
            "better": "higher" if r.higher_is_better else "lower", "value": r.value, "95% interval": interval,
            "random map": r.random,
            "random 95% interval": f"[{_fmt(r.random_low)}, {_fmt(r.random_high)}]" if r.images > 1 else "",
            "image centre": r.centre,
            "verdict": "no value" if not np.isfinite(r.value) else
            "beats the random map" if r.beats_random else "does not beat the random map",
            "images": r.images,
        })
    return out


def agreement_rows(report: TrustReport, kind: str = "kendall") -> list[dict]:
    """The metric × metric rank agreement (:func:`rank_agreement`) as rows, titled."""
    matrix = rank_agreement(report.rows, kind)
    return [{"metric": TITLES.get(a, a), **{TITLES.get(b, b): v for b, v in row.items()}}
            for a, row in matrix.items()]
