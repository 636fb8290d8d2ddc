"""Command line: ``python -m vislib explain IMAGE --out DIR`` (and ``models``, ``methods``).

Models are named as everywhere in vislib: a registered name, ``timm:<name>``, ``hf:<repo or
folder>`` or ``package.module:callable``; ``--models PATH`` (repeatable, before or after the
command) adds the models of a spec file, as does ``VISLIB_MODELS``. Bad input exits with code 2 and
one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import ModelError, VislibError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    prog = "vislib" if Path(sys.argv[0]).name == "vislib" else "python -m vislib"  # the console script
    parser = _Parser(prog=prog, description="See what a convolutional network sees.")
    parser.add_argument("--models", action="append", default=[], dest="spec_files_first", metavar="PATH",
                        help=SPEC_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ex = sub.add_parser("explain", help="explain one image with one or more methods")
    ex.add_argument("image", help="image file (PNG, JPEG, WebP, BMP, ...)")
    ex.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP.format(default=DEFAULT_MODEL))
    ex.add_argument("--weights", default="default",
                    help="'default' (bundled, pretrained from the torch hub / Hugging Face cache, or the "
                         "spec file's), 'none' (seeded random) or a state-dict path (.safetensors, .pt)")
    ex.add_argument("--layer", default=None, help="target layer (default: the model's default layer)")
    what = ex.add_mutually_exclusive_group()  # what to explain (vislib.targets)
    what.add_argument("--target", default=None, help="class index or label (default: the top-1 class)")
    what.add_argument("--label", default=None,
                      help="a label of a multi-label model: its logit (its sigmoid with --score probability)")
    what.add_argument("--regression", default=None, metavar="I[:down]",
                      help="regression output I: what pushes it up (I or I:up) or down (I:down)")
    what.add_argument("--similar", default=None, metavar="IMAGE",
                      help="why is the image similar to IMAGE? (cosine similarity of the model's penultimate "
                           "features, the input of its head)")
    ex.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                    help="a CLIP-like model's prompts, which become its labels (--target names one; default: "
                         "the best match)")
    ex.add_argument("--methods", default="gradcam", help="comma-separated method names")
    ex.add_argument("--score", default="logit", choices=["logit", "probability"])
    ex.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1]")
    ex.add_argument("--colormap", default="jet")
    ex.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ex.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1[:LABEL]",
                    help="detectors: explain this box (input-view pixels; label: index or name, default the "
                         "overlapping detection's)")
    ex.add_argument("--detection", type=int, default=None, metavar="K",
                    help="detectors: explain the K-th detection (0 = the highest score)")
    ex.add_argument("--region", default=None, metavar="LABEL",
                    help="segmenters: explain the pixels predicted as LABEL (Seg-Grad-CAM with gradcam)")
    ex.add_argument("--out", default=None, help="output folder (overlays, maps.npz, scores.json)")
    ex.add_argument("--report", default=None, metavar="HTML",
                    help="also write one self-contained HTML report (images inline) to this file")

    add_evaluate_parser(sub, DEFAULT_MODEL)
    add_models_parser(sub)
    add_features_parser(sub, DEFAULT_MODEL)
    add_layers_parser(sub, DEFAULT_MODEL)
    add_trust_parser(sub, DEFAULT_MODEL)
    add_dashboard_parser(sub)
    sub.add_parser("methods", help="list the methods")
    for command in sub.choices.values():  # --models after any command, too
        command.add_argument("--models", action="append", default=[], dest="spec_files", metavar="PATH",
                             help=SPEC_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        problems = []
        if args.command != "methods":
            problems = register_spec_files(args.spec_files_first + args.spec_files)
        if problems and args.command == "models":  # list what loaded, then each broken table
            _list_models(args, hint=False)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            return 2
        if problems:
            raise ModelError(problems[0])
        if args.command == "explain":
            return _explain(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "features":
            return _features(args)
        if args.command == "layers":
            return _layers(args)
        if args.command == "models":
            return _list_models(args)
        if args.command == "trust":
            return _trust(args)
        if args.command == "methods":
            return _list_methods()
        if args.command == "dashboard":
            return _dashboard(args)
    except VislibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug: still one line unless debugging
        if os.environ.get("VISLIB_DEBUG"):
            raise
        message = f"internal error: {type(exc).__name__}: {exc} (set VISLIB_DEBUG=1 for details)"
        print(message, file=sys.stderr)
        return 1
    return 0


def weights_arg(value: str) -> str | None:
    """``--weights``: ``'none'`` (any case) means random weights (None); anything else as given."""
    return None if value.lower() == "none" else value


def output_folder(path) -> Path:
    """``--out``: the folder, created if needed, or a clear error naming it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VislibError(f"cannot create output folder {out}: {exc.strerror}") from None
    return out


def _explain(args) -> int:
    from .explain import explain
    from .imageio import load_image
    from .models import load_model
    from .render import COLORMAPS

    if args.colormap not in COLORMAPS:
        raise VislibError(f"unknown colormap {args.colormap!r}; available: {', '.join(COLORMAPS)}")
    if not 0.0 <= args.alpha <= 1.0:
        raise VislibError("--alpha must be between 0 and 1")
    if args.out is None and args.report is None:
        raise VislibError("explain needs --out DIR, --report FILE.html, or both")
    image = load_image(args.image)
    weights = weights_arg(args.weights)
    try:
        bundle = load_model(args.model, weights=weights, device=args.device, labels=args.prompts)
    except VislibError as exc:
        if not args.prompts:
            raise
        raise VislibError(f"{exc} (--prompts is for CLIP-like models, whose labels are prompts)") from None
    from .objects.cli import object_target  # --box / --detection / --region: a view of the bundle

    bundle, object_index, object_text = object_target(bundle, image, box=args.box, detection=args.detection,
                                                      region=args.region)
    result = explain(bundle, image, methods=args.methods, layer=args.layer,
                     target=_cli_target(args) if object_index is None else object_index, score=args.score)
    if args.report is not None:
        _write_report(result, args)
    if args.out is None:
        print(f"{result.model}: explained {result.target_label()!r} → {args.report}")
        return 0
    out = output_folder(args.out)
    view = result.input_image
    assert not isinstance(view, list)  # one image in, one input view out
    view.save(out / "input.png")
    arrays: dict[str, np.ndarray] = {}
    for method in result.methods:
        result.overlay(method, alpha=args.alpha, colormap=args.colormap).save(out / f"{method}.png")
        arrays[method] = result.maps[method]
        arrays[f"{method}_raw"] = result.raw[method]
    # numpy's stubs match **arrays against allow_pickle: bool; the keys are method names
    np.savez_compressed(out / "maps.npz", **arrays)  # type: ignore[arg-type]
    scores = {
        "model": result.model,
        "weights": result.weights,
        "layer": result.layer,
        "score": result.score,
        "target": {"index": result.target, "label": result.target_label()},
        "explained": result.describe_target(),  # what the maps explain, e.g. "logit of class 'dog'"
        "outputs": result.scores,  # what "top5" holds: probabilities, sigmoids, regression values, ...
        "top5": [{"index": i, "label": label, "probability": p} for i, label, p in result.top_k(5)],
        "flat": {m: bool(result.flat[m]) for m in result.methods},
        "timings_s": result.timings,
        "pass_timings_s": result.pass_timings,
        **({"explained": object_text} if object_text else {}),
        "vislib_version": result.vislib_version,
    }
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    explained = result.describe_target()
    if result.scores in ("regression", "embedding"):
        print(f"{result.model}: explained the {explained} at {result.layer} with "
              f"{', '.join(result.methods)} → {out}")
        return 0
    top = result.top_k(1)[0]
    print(f"{result.model}: predicted {top[1]} ({top[2]:.1%}); explained the {explained} "
          f"at {result.layer} with {', '.join(result.methods)} → {out}")
    return 0


def _write_report(result, args) -> None:
    from .report import write_explanation_report

    try:
        write_explanation_report(result, args.report, image_name=Path(args.image).name, alpha=args.alpha,
                                 colormap=args.colormap)
    except OSError as exc:
        raise VislibError(f"cannot write the report {args.report}: {exc.strerror}") from None


def _cli_target(args):
    """The target of ``explain``'s flags: --label, --regression, --similar, else --target as before."""
    from .targets import Label, Regression, Similarity

    if args.label is not None:
        return Label(args.label, score=args.score)
    if args.regression is not None:
        index, _, direction = args.regression.partition(":")
        if not index.strip().isdigit() or direction not in ("", "up", "down"):
            raise VislibError(f"--regression takes I, I:up or I:down (I an output index), "
                              f"not {args.regression!r}")
        return Regression(int(index), sign=-1 if direction == "down" else 1)
    if args.similar is not None:
        from .imageio import load_image

        return Similarity(load_image(args.similar), name=Path(args.similar).name)
    return args.target


def _list_models(args, hint: bool = True) -> int:
    from .models import list_models, model_spec

    if args.source == "timm":
        from .models.timm_zoo import timm_tags

        tags = timm_tags()
        rows = [(n, "timm", _tags_text(tags.get(n[len("timm:"):], []))) for n in list_models("timm")]
    elif args.source == "hf":
        rows = [(n, "hf", "in the local Hugging Face cache") for n in list_models("hf")]
    else:
        rows = [(n, model_spec(n).source, model_spec(n).description) for n in list_models(args.source)]
    pattern = (args.filter or "").lower()
    if any(c in pattern for c in "*?["):
        import fnmatch

        rows = [r for r in rows if fnmatch.fnmatch(r[0].lower(), pattern)
                or fnmatch.fnmatch(r[0].lower().split(":", 1)[-1], pattern)]
    elif pattern:
        rows = [r for r in rows if pattern in r[0].lower()]
    width = max([22] + [len(r[0]) + 1 for r in rows])
    for name, source, description in rows:
        print(f"{name:{width}s} {source:12s} {description}".rstrip())
    if args.source is None and hint:
        print("(also: timm:<name>, hf:<repo or folder>, package.module:callable; "
              "--source timm lists timm's models)", file=sys.stderr)
    return 0


def _tags_text(tags: list[str]) -> str:
    return f"pretrained: {', '.join(tags)}" if tags else "no pretrained weights"


def _list_methods() -> int:
    from .methods import METHODS
    from .targets import accepted_targets

    short = {"classification": "cls", "detection": "det", "segmentation": "seg"}
    rows = [(name, cls.family, cls.passes or "–", accepted_targets(cls),
             ",".join(short.get(t, t) for t in cls.tasks), cls.paper or cls.title)
            for name, cls in METHODS.items()]
    header = ("name", "family", "passes", "targets", "tasks", "paper")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
    notes = [f"{name}: {cls.task_reason}" for name, cls in METHODS.items() if len(cls.tasks) < 3]
    if notes:  # on stderr: stdout stays one row per method
        print("tasks: cls = classification, det = detection (a box), seg = segmentation (a region); "
              "why not all:", file=sys.stderr)
        for note in notes:
            print(f"  {note}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------
# models: the naming scheme, spec files and the listing

MODEL_HELP = ("model: a registered name (python -m vislib models), timm:NAME[.TAG], hf:REPO or hf:FOLDER, "
              "package.module:callable, or a spec file's name (default: {default})")
SPEC_HELP = "a model spec file (TOML, [models.NAME] tables); repeatable. VISLIB_MODELS adds more"
SOURCES = ("bundled", "spec", "torchvision", "timm", "hf")


def register_spec_files(paths: list[str]) -> list[str]:
    """Register every valid table of the spec files of ``--models`` and ``VISLIB_MODELS``; returns
    each problem (file, table, key), one line each. ``models`` lists what loaded and reports them;
    any other command stops at the first."""
    from .models import register_spec_files as register
    from .models import spec_files_from_env

    return [e for report in register(spec_files_from_env() + list(paths)) for e in report.errors]


def add_models_parser(sub) -> None:
    ls = sub.add_parser("models", help="list the models (registered ones, or one source's)")
    ls.add_argument("--source", choices=SOURCES, default=None,
                    help="only this source; 'timm' lists every timm model, 'hf' the cached Hugging Face ones")
    ls.add_argument("--filter", default=None, metavar="TEXT",
                    help="only names containing TEXT (case-insensitive; * and ? for a pattern)")


# --------------------------------------------------------------------------------------------------
# evaluate: a labelled dataset → metrics, tables and an offline HTML report


def _add_data_options(parser, default_model: str) -> None:
    """Data, model and engine options shared by ``evaluate`` and ``features``."""
    parser.add_argument("data", help="an ImageFolder folder or .zip (one folder per class), 'shapes' (the "
                                     "generated test split, with masks) or 'shapes+mark' (every image "
                                     "marked); evaluate also takes detection / segmentation sets: a COCO "
                                     ".json, a YOLO folder (labels/, images/), a folder with masks/ (PNG), "
                                     "or 'scenes[:N]' (the generated scenes)")
    parser.add_argument("--model", default=default_model, help=f"model name (default: {default_model})")
    parser.add_argument("--weights", default="default",
                        help="'default', 'none' (random) or a state-dict path")
    parser.add_argument("--layer", default=None, help="target layer (default: the model's default layer)")
    parser.add_argument("--limit", type=int, default=None, help="at most N images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; with --engine ray: per worker, default 1)")
    parser.add_argument("--engine", default="local", choices=["local", "ray"],
                        help="local (this process, the default) or ray (a Ray Data actor pool)")
    parser.add_argument("--address", default=None,
                        help="with --engine ray: the Ray cluster's address (default: $RAY_ADDRESS; none: a "
                             "local Ray on 127.0.0.1, started and stopped by the run)")
    parser.add_argument("--workers", type=int, default=None,
                        help="with --engine ray: actors (default: one per GPU of the cluster, else one "
                             "per CPU)")
    parser.add_argument("--parquet", action="store_true",
                        help="also write the tables as Parquet (needs pyarrow, installed with Ray)")
    parser.add_argument("--out", required=True, help="output folder")


def add_evaluate_parser(sub, default_model: str) -> None:
    ev = sub.add_parser("evaluate", help="evaluate a model and its explanations on a labelled dataset")
    _add_data_options(ev, default_model)
    ev.add_argument("--methods", default="gradcam", help="comma-separated method names")
    ev.add_argument("--explain", default="predicted", choices=["predicted", "true"],
                    help="the class the maps explain (default: the predicted one)")
    ev.add_argument("--curves", type=int, default=20,
                    help="deletion/insertion curves for the first N images (default 20; 0: none)")
    ev.add_argument("--no-confidence", action="store_true", help="skip Average Drop / Increase in Confidence")
    ev.add_argument("--gallery", type=int, default=24, help="misclassified images shown in the report")
    ev.add_argument("--maps", action="store_true",
                    help="also write every image's maps to OUT/maps (compressed float16 shards)")
    ev.add_argument("--metrics", default=None,
                    help="trust metrics, each beside a random map with a bootstrap interval (OUT/trust.csv): "
                         "comma-separated, e.g. road,faithfulness_correlation,sparseness; 'fast' or 'all'")


def add_features_parser(sub, default_model: str) -> None:
    fe = sub.add_parser("features", help="Zeiler & Fergus: the top activations of every unit of a layer "
                                         "across a dataset, with their Deconvnet projections")
    _add_data_options(fe, default_model)
    fe.add_argument("--top", type=int, default=9, help="activations per channel (default 9)")
    fe.add_argument("--figures", action="store_true",
                    help="also write one figure per channel (OUT/figures/channel-NNNNN.png)")


def _check_numbers(args, names) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and (value < 0 or (value == 0 and name not in ("curves", "gallery"))):
            raise VislibError(f"--{name.replace('_', '-')} must be a positive number")
    if args.engine == "local" and (args.address or args.workers):
        raise VislibError("--address and --workers go with --engine ray")


def _prepare(args):
    """(bundle, images, out folder) from the shared options, every check first."""
    from .datasets import open_dataset
    from .hooks import resolve_layer
    from .models import load_model

    if args.threads and args.engine == "local":
        import torch

        torch.set_num_threads(args.threads)
    if args.parquet:
        from .evaluate.report import require_pyarrow

        require_pyarrow()
    if args.engine == "ray":
        from .evaluate.ray_engine import require_ray

        require_ray()
    weights = weights_arg(args.weights)
    bundle = load_model(args.model, weights=weights, device=args.device)
    resolve_layer(bundle, args.layer)
    images = open_dataset(args.data, bundle.labels, limit=args.limit)
    out = output_folder(args.out)
    for line in images.report.lines() if images.report else []:
        print(f"note: {line}", file=sys.stderr)
    return bundle, images, out


def _engine_options(args) -> dict:
    options = dict(engine=args.engine, address=args.address, workers=args.workers)
    if args.engine == "ray":
        options["threads"] = args.threads or 1
    return options


def _evaluate(args) -> int:
    from .evaluate import evaluate, map_bytes, write_report
    from .evaluate.progress import StderrBar, format_bytes
    from .explain import parse_methods
    from .metrics.trust import parse_metrics

    _check_numbers(args, ("limit", "batch_size", "curves", "gallery", "threads", "workers"))
    from .objects.cli import evaluate_command, is_object_set

    if is_object_set(args.data):  # a detection / segmentation set: mAP / mIoU and the error list
        return evaluate_command(args)
    methods = parse_methods(args.methods)
    trust_names = parse_metrics(args.metrics) if args.metrics else ()
    from .evaluate.report import _plotly

    _plotly("io")  # before the run: report.html needs the dashboard extra's plotly
    bundle, images, out = _prepare(args)
    maps_dir = out / "maps" if args.maps else None
    if maps_dir is not None:
        size = map_bytes(len(images), len(methods), bundle.input_size)
        if size > 2**30:
            print(f"note: the maps take up to {format_bytes(size)} before compression ({len(images)} "
                  f"images × {len(methods)} methods × {bundle.input_size}² float16) in {maps_dir}",
                  file=sys.stderr)
    bar = StderrBar("evaluating")
    try:
        result = evaluate(bundle, images, methods, layer=args.layer, explained=args.explain,
                          batch_size=args.batch_size, confidence=not args.no_confidence, curves=args.curves,
                          progress=bar, maps_dir=maps_dir, trust=trust_names, **_engine_options(args))
    finally:
        bar.close()
    write_report(result, out, bundle=bundle, images=images, gallery=args.gallery, parquet=args.parquet)
    if trust_names:
        from .metrics.trust import format_table, write_csv

        report = result.trust_report()
        write_csv(report, out / "trust.csv")
        print(format_table(report))
    wrong = int((~result.correct).sum())
    failed = f", {len(result.failed)} unreadable" if result.failed else ""
    print(f"{result.model} on {result.dataset}: accuracy {result.accuracy:.1%} on {len(result)} images, "
          f"{wrong} misclassified{failed} ({result.engine}) → {out / 'report.html'}")
    return 0


def _features(args) -> int:
    from .dataset_features import build_index, channel_figure, unit_views
    from .evaluate.progress import StderrBar

    _check_numbers(args, ("limit", "batch_size", "threads", "workers", "top"))
    bundle, images, out = _prepare(args)
    bar = StderrBar("features")
    try:
        index = build_index(bundle, images, out, args.layer, top=args.top, batch_size=args.batch_size,
                            parquet=args.parquet, progress=bar, **_engine_options(args))
    finally:
        bar.close()
    if args.figures:
        (out / "figures").mkdir(exist_ok=True)
        for channel in range(index.shape[0]):
            views = unit_views(index, channel)
            if views:
                channel_figure(views).save(out / "figures" / f"channel-{channel:05d}.png")
    failed = f"; {len(index.failed)} unreadable images" if index.failed else ""
    print(f"{index.model} {index.layer}: the top {index.top} of {index.shape[0]} channels over "
          f"{index.n_images} images{failed} ({index.engine}) → {out / 'index.csv'}")
    return 0


# --------------------------------------------------------------------------------------------------
# layers: the layer table of a model (shapes as the methods see them) and the default's reason


def add_layers_parser(sub, default_model: str) -> None:
    ly = sub.add_parser("layers", help="a model's layers as the methods see them, and its default layer")
    ly.add_argument("--model", default=default_model, help=f"model name (default: {default_model})")
    ly.add_argument("--weights", default="none",
                    help="'none' (random: shapes do not depend on weights; the default), 'default' or a path")
    ly.add_argument("--all", action="store_true", help="also the modules that give no map")


def _layers(args) -> int:
    from .layers import layer_table_lines
    from .models import load_model

    weights = None if args.weights == "none" else args.weights
    bundle = load_model(args.model, weights=weights, device="cpu")
    for line in layer_table_lines(bundle, everything=args.all):
        print(line)
    return 0


# --------------------------------------------------------------------------------------------------
# dashboard: the Streamlit app, from a checkout or an installed package (the dashboard extra)


def add_dashboard_parser(sub) -> None:
    da = sub.add_parser("dashboard", help="start the dashboard (streamlit; needs the dashboard extra)")
    da.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    da.add_argument("--address", default=None,
                    help="address to listen on (default: streamlit's, as scripts/dashboard.sh)")


def dashboard_command(port: int, specs: list[str],
                      address: str | None = None) -> tuple[list[str], dict, Path]:
    """(command line, environment, working folder) of ``streamlit run`` on the packaged app.py: its
    folder is the working one, so that its ``.streamlit/config.toml`` applies; spec files (``--models``
    and ``VISLIB_MODELS``) become absolute paths, taken from the current folder."""
    from ._resources import resource
    from .models import spec_files_from_env

    app = resource("dashboard", "app.py")
    if not app.is_file():
        raise VislibError(f"the dashboard is not part of this installation ({app} is missing)")
    paths = [str(Path(p).expanduser().resolve()) for p in spec_files_from_env() + list(specs)]
    env = {**os.environ, "VISLIB_MODELS": os.pathsep.join(paths)}
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
               "--server.fileWatcherType", "none"]
    if address:
        command += ["--server.address", address]
    return command, env, app.parent


def _dashboard(args) -> int:
    import subprocess

    from ._optional import require

    require("streamlit", "dashboard", feature="vislib dashboard")
    if not 0 < args.port < 65536:
        raise VislibError("--port must be between 1 and 65535")
    command, env, folder = dashboard_command(args.port, args.spec_files_first + args.spec_files, args.address)
    return subprocess.call(command, env=env, cwd=folder)


# --------------------------------------------------------------------------------------------------
# trust: can I trust this map? The trust metrics for one image, beside a random map


def add_trust_parser(sub, default_model: str) -> None:
    tr = sub.add_parser("trust", help="how far to trust the maps of one image: metrics beside a random map")
    tr.add_argument("image", help="image file")
    tr.add_argument("--model", default=default_model, help=f"model name (default: {default_model})")
    tr.add_argument("--weights", default="default", help="'default', 'none' (random) or a state-dict path")
    tr.add_argument("--layer", default=None, help="target layer (default: the model's default layer)")
    tr.add_argument("--target", default=None, help="class index or label (default: the top-1 class)")
    tr.add_argument("--methods", default="gradcam", help="comma-separated method names")
    tr.add_argument("--metrics", default="fast",
                    help="comma-separated trust metrics (default 'fast'; 'all' for every one)")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tr.add_argument("--json", default=None, help="also write the rows to this JSON file")


def _trust(args) -> int:
    from .explain import explain, parse_methods
    from .imageio import load_image
    from .metrics.trust import format_table, parse_metrics, trust_for_explanation
    from .models import load_model

    methods = parse_methods(args.methods)
    names = parse_metrics(args.metrics)
    image = load_image(args.image)
    weights = weights_arg(args.weights)
    bundle = load_model(args.model, weights=weights, device=args.device)
    result = explain(bundle, [image], methods=methods, layer=args.layer,
                     target=None if args.target is None else [args.target])
    report = trust_for_explanation(bundle, result, names)
    print(f"{result.model}: explained {result.target_label()!r} at {result.layer}; one image, so no "
          f"interval (use 'vislib evaluate --metrics' for a dataset)")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.table(), indent=2))
    return 0
