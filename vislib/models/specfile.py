"""Model spec files: TOML tables that describe models completely, for the API, the CLI and the dashboard.

```toml
[models.my_resnet]
source = "resnet18"          # a torchvision or bundled name, timm:…, hf:… or package.module:callable
weights = "my.safetensors"   # relative to this file; or "default" / "none"
labels = "labels.txt"        # one label per line, or a .json list; or an inline list
layer = "layer4"
description = "ResNet-18 fine-tuned on our 12 classes"
```

Keys (all but ``source`` optional): ``source``, ``kwargs`` (a table for the builder: the factory's
arguments, ``timm.create_model`` or ``torchvision.models.get_model`` keywords, Hugging Face config
values), ``weights``, ``labels``, ``input_size`` (int or [H, W]), ``resize`` (int: the shorter side;
[H, W]: exactly), ``channels``, ``mean``, ``std``, ``interpolation``, ``layer`` (the default layer),
``output`` (an index, a key, or "package.module:callable" applied to the output), ``description``,
``scores`` (what the output is: "logits", "probabilities", "sigmoid" for multi-label, "regression",
"embedding"; default: detected), ``prompts`` (a CLIP-like model's prompts, which are its labels).
Every problem is a :class:`ModelError` naming the file, the table and the key.

**Spec files are trusted configuration.** A ``source`` or ``output`` of the form
``package.module:callable`` imports and runs the operator's own code (a module next to the spec
file is found there). Spec files come from the operator — ``--models`` on the command line,
``VISLIB_MODELS`` for the dashboard, ``vislib.register_models`` — never from a browser upload.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..errors import ModelError, VislibError
from .bundle import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .registry import _LOCK, _REGISTRY, ModelSpec, model_spec, register_source, source_spec
from .source import FACTORY_PATTERN, SourceModel, interpolation_mode, preprocess, scheme_of

ENV_VARIABLE = "VISLIB_MODELS"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
KEYS = ("source", "kwargs", "weights", "labels", "input_size", "resize", "channels", "mean", "std",
        "interpolation", "layer", "output", "description", "scores", "prompts")
MAX_SPEC_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ModelEntry:
    """One ``[models.NAME]`` table, checked: paths resolved against the spec file's folder."""

    name: str
    file: str  # the spec file, absolute
    source: str
    kwargs: dict = dataclasses.field(default_factory=dict, hash=False)
    weights: str | None = "default"  # an absolute path, "default" or None
    labels: tuple[str, ...] | None = None
    labels_from: str = ""
    input_size: int | tuple[int, int] | None = None
    resize: int | tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    layer: str | None = None
    output: int | str | None = None
    description: str = ""
    scores: str | None = None

    @property
    def context(self) -> str:
        return f"{self.file} [models.{self.name}]"


@dataclass(frozen=True)
class SpecFileReport:
    """What registering one spec file did: the names it added, and each problem (one line each,
    naming the file, the table and the key): the whole file's, or each broken table's."""

    path: str
    names: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def error(self) -> str | None:
        """The problems on one line each, or None."""
        return "\n".join(self.errors) or None


def read_spec_file(path: str | os.PathLike) -> list[ModelEntry]:
    """Parse and check a spec file (no model is built, no factory imported); the first broken table
    raises (:func:`read_spec_tables` keeps the others)."""
    entries, errors = read_spec_tables(path)
    if errors:
        raise errors[0]
    return entries


def read_spec_tables(path: str | os.PathLike) -> tuple[list[ModelEntry], list[ModelError]]:
    """Parse and check a spec file, table by table: (the valid entries, one error per broken table).
    A problem with the whole file (missing, not TOML, no table) raises."""
    file = Path(path).expanduser()
    try:
        file = file.resolve(strict=True)
        if file.stat().st_size > MAX_SPEC_BYTES:
            raise ModelError(f"{file}: larger than {MAX_SPEC_BYTES // 1024} KB, not a spec file")
        data = _toml().loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"spec file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file}: cannot read it ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ModelError(f"{file}: not valid TOML ({exc})") from None
    extra = [k for k in data if k != "models"]
    if extra:
        raise ModelError(f"{file}: unknown top-level key {extra[0]!r}; a spec file holds "
                         f"[models.NAME] tables")
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ModelError(f"{file}: no [models.NAME] table")
    entries, errors = [], []
    for name, table in tables.items():
        try:
            entries.append(_entry(file, name, table))
        except ModelError as exc:
            errors.append(exc)
    return entries, errors


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ModelError("spec files need Python >= 3.11 (tomllib), or pip install tomli") from None
    return tomllib


def _entry(file: Path, name: str, table) -> ModelEntry:
    where = f"{file} [models.{name}]"
    if not NAME_PATTERN.match(name):
        raise ModelError(f"{where}: a model name takes letters, digits, '_', '-' and '.' only "
                         f"(':' and '/' belong to timm:, hf: and factory names)")
    if not isinstance(table, dict):
        raise ModelError(f"{where}: must be a table of keys")
    for key in table:
        if key not in KEYS:
            raise ModelError(f"{where}: unknown key {key!r}; the keys are {', '.join(KEYS)}")
    if "source" not in table:
        raise ModelError(f"{where}: missing key 'source' (a torchvision name, timm:…, hf:… or "
                         f"package.module:callable)")
    get = _Getter(where, table)
    source = get.text("source") or ""  # present (checked above), and TOML has no null
    _check_source(where, source)
    fields: dict = {"name": name, "file": str(file), "source": source}
    fields["kwargs"] = get.mapping("kwargs")
    fields["weights"] = _weights(where, file, get.text("weights"))
    if "labels" in table:
        fields["labels"], fields["labels_from"] = _labels(where, file, table["labels"])
    fields["input_size"] = get.size("input_size")
    fields["resize"] = get.size("resize")
    channels = get.integer("channels")
    fields["channels"] = channels
    for key in ("mean", "std"):
        values = get.numbers(key)
        if values is not None and len(values) == 1 and (channels or 3) > 1:
            values = values * (channels or 3)
        if values is not None and len(values) != (channels or 3):
            raise ModelError(f"{where} {key}: {len(values)} values for {channels or 3} input channels")
        if key == "std" and values is not None and min(values) <= 0:
            raise ModelError(f"{where} std: every value must be positive")
        fields[key] = values
    interpolation = get.text("interpolation")
    if interpolation is not None:
        try:
            interpolation_mode(interpolation)
        except ModelError as exc:
            raise ModelError(f"{where} interpolation: {exc}") from None
    fields["interpolation"] = interpolation
    fields["layer"] = get.text("layer")
    output = table.get("output")
    if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str))):
        raise ModelError(f"{where} output: an index, a key or \"package.module:callable\", "
                         f"not {type(output).__name__}")
    fields["output"] = output
    fields["description"] = get.text("description") or ""
    scores = get.text("scores")
    if scores is not None:
        from ..targets import OUTPUT_KINDS

        if scores not in OUTPUT_KINDS:
            raise ModelError(f"{where} scores: one of {', '.join(OUTPUT_KINDS)}, not {scores!r}")
    fields["scores"] = scores
    if "prompts" in table:
        if "labels" in table:
            raise ModelError(f"{where}: give labels or prompts, not both (a zero-shot model's labels are "
                             f"its prompts)")
        prompts = table["prompts"]
        if (not isinstance(prompts, list) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise ModelError(f"{where} prompts: need a non-empty list of non-empty strings")
        fields["labels"], fields["labels_from"] = tuple(prompts), "the spec file's prompts"
    return ModelEntry(**fields)


class _Getter:
    """Typed reads of one table's keys; a wrong type names the file, table and key."""

    def __init__(self, where: str, table: dict) -> None:
        self.where, self.table = where, table

    def _fail(self, key: str, wanted: str) -> NoReturn:
        value = self.table[key]
        raise ModelError(f"{self.where} {key}: must be {wanted}, not {value!r}")

    def text(self, key: str) -> str | None:
        value = self.table.get(key)
        if value is not None and not isinstance(value, str):
            self._fail(key, "a string")
        return value

    def mapping(self, key: str) -> dict:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            self._fail(key, "a table (kwargs = { num_classes = 10 })")
        return dict(value)

    def integer(self, key: str) -> int | None:
        value = self.table.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            self._fail(key, "a positive integer")
        return value

    def size(self, key: str) -> int | tuple[int, int] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            return (value[0], value[1])
        self._fail(key, "a positive integer or [height, width]")

    def numbers(self, key: str) -> tuple[float, ...] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (float(value),)
        if (isinstance(value, list) and value
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return tuple(float(v) for v in value)
        self._fail(key, "a number or a list of numbers")


def _check_source(where: str, source: str) -> None:
    scheme = scheme_of(source)
    if scheme in ("hf", "factory"):
        return
    if scheme == "timm":
        try:
            model_spec(source)
        except VislibError as exc:
            raise ModelError(f"{where} source: {exc}") from None
        return
    with _LOCK:
        known = _REGISTRY.get(source)
    if known is None or known.source == "spec":
        what = "another spec model" if known is not None else "no torchvision or bundled model"
        raise ModelError(f"{where} source: {source!r} is {what}; use a torchvision or bundled name, "
                         f"timm:<name>, hf:<repo> or package.module:callable")


def _weights(where: str, file: Path, value: str | None) -> str | None:
    if value is None or value.lower() == "default":
        return "default"
    if value.lower() == "none":
        return None
    path = (file.parent / value).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{where} weights: file not found: {path}")
    return str(path)


def _labels(where: str, file: Path, value) -> tuple[tuple[str, ...], str]:
    if isinstance(value, list):
        labels, origin = value, f"{file.name} (inline)"
    elif isinstance(value, str):
        path = (file.parent / value).expanduser().resolve()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{where} labels: file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{where} labels: cannot read {path} ({type(exc).__name__})") from None
        if path.suffix.lower() == ".json":
            try:
                labels = json.loads(text)
            except ValueError as exc:
                raise ModelError(f"{where} labels: {path.name} is not valid JSON ({exc})") from None
        else:
            labels = [line.strip() for line in text.splitlines() if line.strip()]
        origin = str(path)
    else:
        raise ModelError(f"{where} labels: a file (one label per line, or a JSON list) or a list of strings")
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise ModelError(f"{where} labels: need a non-empty list of strings")
    return tuple(labels), origin


# --------------------------------------------------------------------------------------------------
# building and registering


def entry_source(entry: ModelEntry, weights, kwargs: dict) -> SourceModel:
    """Build a spec entry: its source with the entry's kwargs and weights, then its overrides.
    ``weights="default"`` means the entry's own ``weights``."""
    if weights == "default":
        weights = entry.weights
    args = {**entry.kwargs, **kwargs}
    try:
        if scheme_of(entry.source) == "factory":
            from .factory import factory_source

            src = factory_source(entry.source, weights, args, search_path=Path(entry.file).parent)
        else:
            inner = model_spec(entry.source)
            if inner.make is None:
                raise ModelError(f"source {entry.source!r} cannot be used in a spec file")
            src = inner.make(weights, args)
    except VislibError as exc:
        raise type(exc)(f"{entry.context}: {exc}") from None
    src.source, src.context = "spec", entry.context
    src.description = entry.description or src.description
    if entry.labels is not None:
        src.labels, src.labels_from = list(entry.labels), entry.labels_from
    if entry.layer is not None:
        src.default_layer = entry.layer
        src.default_reason = f"the spec file's choice ({Path(entry.file).name})"
    if entry.output is not None:
        src.output = _output(entry)
    if entry.channels is not None:
        src.channels = entry.channels
    if entry.scores is not None:
        src.scores = entry.scores
    src.preprocess = _preprocess(entry, src)
    return src


def _output(entry: ModelEntry):
    if isinstance(entry.output, str) and FACTORY_PATTERN.match(entry.output):
        from .factory import resolve_callable

        try:
            return resolve_callable(entry.output, Path(entry.file).parent, what="output")
        except ModelError as exc:
            raise ModelError(f"{entry.context} output: {exc}") from None
    return entry.output


def _preprocess(entry: ModelEntry, src: SourceModel):
    """The source's preprocessing with the entry's input_size / resize / channels / mean / std /
    interpolation applied. ``input_size`` alone resizes to it (shorter side for an int, exactly for
    [H, W]) and centre-crops it."""
    keys = ("input_size", "resize", "channels", "mean", "std", "interpolation")
    if all(getattr(entry, k) is None for k in keys):
        return src.preprocess
    base = src.preprocess
    if base is not None and not isinstance(base, Preprocess):
        raise ModelError(f"{entry.context} input_size: the source keeps its own preprocessing callable; "
                         f"the keys {', '.join(keys)} cannot change it")
    channels = entry.channels or (getattr(base, "channels", None) if base is not None else None) or 3
    crop = entry.input_size if entry.input_size is not None else getattr(base, "crop", 224)
    resize = entry.resize if entry.resize is not None else (
        entry.input_size if entry.input_size is not None else getattr(base, "resize", 224))
    mean = entry.mean or (base.mean if base is not None and len(base.mean) == channels else None)
    std = entry.std or (base.std if base is not None and len(base.std) == channels else None)
    if mean is None or std is None:  # ImageNet statistics for RGB, 0.5 otherwise (as make_bundle does)
        mean = mean or (IMAGENET_MEAN if channels == 3 else (0.5,) * channels)
        std = std or (IMAGENET_STD if channels == 3 else (0.5,) * channels)
    interpolation = interpolation_mode(entry.interpolation) if entry.interpolation else (
        base.interpolation if base is not None else interpolation_mode("bilinear"))
    try:
        return preprocess(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation,
                          channels=channels, antialias=getattr(base, "antialias", True))
    except VislibError as exc:
        raise ModelError(f"{entry.context}: {exc}") from None


def entry_spec(entry: ModelEntry) -> ModelSpec:
    def available() -> bool:
        if entry.weights is None or entry.weights != "default":
            return entry.weights is None or Path(entry.weights).is_file()
        if scheme_of(entry.source) == "factory":
            return True
        from .registry import pretrained_available

        return pretrained_available(entry.source)

    return source_spec(entry.name, "spec", entry.description or f"{entry.source} ({Path(entry.file).name})",
                       lambda weights, kwargs: entry_source(entry, weights, kwargs),
                       origin=entry.file, available=available)


def register_models(path: str | os.PathLike) -> list[str]:
    """Add the models of a spec file to the registry; returns their names.

    Registering the same file again replaces its models (a table removed from the file is
    removed); a name that another source or another spec file already holds is an error.
    """
    return _register(read_spec_file(path))


def _register(entries: list[ModelEntry]) -> list[str]:
    file = entries[0].file
    with _LOCK:
        for entry in entries:
            held = _REGISTRY.get(entry.name)
            if held is not None and held.origin != file:
                holder = held.origin or f"the {held.source} models"
                raise ModelError(f"{entry.context}: the name {entry.name!r} is already taken by {holder}")
        for name in [n for n, s in _REGISTRY.items() if s.origin == file]:
            del _REGISTRY[name]
        for entry in entries:
            register_source(entry_spec(entry))
    return [e.name for e in entries]


def unregister_models(path: str | os.PathLike) -> list[str]:
    """Remove the models a spec file registered; returns their names."""
    file = str(Path(path).expanduser().resolve())
    with _LOCK:
        names = [n for n, s in _REGISTRY.items() if s.origin == file]
        for name in names:
            del _REGISTRY[name]
    return names


def register_spec_files(paths: Sequence[str | os.PathLike]) -> list[SpecFileReport]:
    """Register several spec files, never raising: every valid table of every file, and one report
    per file with the names it added and each problem (for the dashboard and the CLI, which show
    them). A broken table does not hide the valid ones beside it."""
    reports = []
    for path in paths:
        try:
            entries, broken = read_spec_tables(path)
            errors = [str(exc) for exc in broken]
            names: list[str] = []
            for entry in entries:  # one at a time: a name taken elsewhere refuses that table only
                try:
                    names += _register_one(entry, keep=[e.name for e in entries])
                except VislibError as exc:
                    errors.append(str(exc))
            if not entries:
                unregister_models(path)
            reports.append(SpecFileReport(str(path), tuple(names), tuple(errors)))
        except VislibError as exc:
            reports.append(SpecFileReport(str(path), errors=(str(exc),)))
    return reports


def _register_one(entry: ModelEntry, keep: list[str]) -> list[str]:
    """Register one entry of a file whose valid tables are ``keep`` (the file's other models that
    are no longer in it are removed)."""
    with _LOCK:
        held = _REGISTRY.get(entry.name)
        if held is not None and held.origin != entry.file:
            holder = held.origin or f"the {held.source} models"
            raise ModelError(f"{entry.context}: the name {entry.name!r} is already taken by {holder}")
        for name in [n for n, s in _REGISTRY.items() if s.origin == entry.file and n not in keep]:
            del _REGISTRY[name]
        register_source(entry_spec(entry), replace=True)
    return [entry.name]


def spec_files_from_env(value: str | None = None) -> list[str]:
    """The spec files listed in ``VISLIB_MODELS`` (``os.pathsep``-separated, like ``PATH``)."""
    value = os.environ.get(ENV_VARIABLE, "") if value is None else value
    return [p for p in value.split(os.pathsep) if p.strip()]
