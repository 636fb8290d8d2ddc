"""Labelled image sets for evaluation: ImageFolder zips and folders, and the generated shapes split.

An *ImageFolder* layout has one folder per class (``circle/img1.png``, ``square/…``). The folder names
are matched to the model's labels (case, ``_``/``-``/spaces, a numeric prefix such as ``03_circle``,
a plural ``s`` and plain class indices are forgiven) and everything that did not fit is listed in a
:class:`MatchReport`: unmatched or empty folders, labels without a folder, files that are not images,
files outside any class folder. A single wrapping folder (``data/circle/…``) is looked through.

Zips are untrusted: a member path that is absolute or climbs out (``..``) refuses the whole archive,
and so does one that would expand past :data:`MAX_TOTAL_BYTES` or :data:`MAX_MEMBERS` members or
compresses suspiciously well (a zip bomb). Nothing is ever extracted to disk; members are read into
memory, bounded by their declared size, and decoded by :mod:`vislib.imageio`.

The shapes split (:class:`ShapesImages`) comes with exact object masks; it is rendered once and kept
in a cache folder (``VISLIB_CACHE``, default ``~/.cache/vislib``) so that loading is a memory copy.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import re
import stat
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .imageio import MAX_BYTES, decode_image_bytes

MAX_MEMBERS = 50_000
MAX_TOTAL_BYTES = 2 * 1024**3  # declared uncompressed size of all members
MAX_RATIO = 500  # uncompressed / compressed size of one member above 1 MB (DEFLATE tops out near 1030)
MAX_ZIP_BYTES = 2 * 1024**3
IGNORED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first bytes are those of an allowed image format (PNG, JPEG, GIF, BMP,
    TIFF, WebP)."""
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


# --------------------------------------------------------------------------------------------------
# Matching folder names to labels


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-.]+", " ", text.strip().lower()).strip()


def match_label(folder: str, labels: list[str]) -> tuple[int | None, str]:
    """(label index or None, how): exact, case/separator-insensitive, numeric prefix, plural, index."""
    if folder in labels:
        return labels.index(folder), "exact"
    normed = [_norm(lab) for lab in labels]
    name = _norm(folder)
    if name in normed:
        return normed.index(name), "ignoring case and separators"
    stripped = re.sub(r"^\d+\s+", "", name)
    if stripped != name and stripped in normed:
        return normed.index(stripped), "ignoring the numeric prefix"
    for candidate in (stripped[:-1] if stripped.endswith("s") else None,
                      stripped[:-2] if stripped.endswith("es") else None):
        if candidate and candidate in normed:
            return normed.index(candidate), "as a plural"
    if name.isdigit() and int(name) < len(labels):
        return int(name), "as a class index"
    return None, ""


def suggest_label(folder: str, labels: list[str]) -> str | None:
    normed = [_norm(lab) for lab in labels]
    close = difflib.get_close_matches(_norm(folder), normed, n=1, cutoff=0.6)
    return labels[normed.index(close[0])] if close else None


# --------------------------------------------------------------------------------------------------
# The report


@dataclass
class MatchReport:
    """What an ImageFolder source held and how it was matched to the model's labels."""

    source: str
    root: str = ""  # wrapping folder(s) looked through, e.g. "data/"
    matched: list[tuple[str, str, int, str]] = field(default_factory=list)  # folder, label, images, how
    unmatched: list[tuple[str, int, str | None]] = field(default_factory=list)  # folder, files, suggestion
    empty: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # labels without any image
    non_images: list[str] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)  # files outside any class folder
    skipped: list[tuple[str, str]] = field(default_factory=list)  # path, why (links, encrypted, too large)
    ignored: int = 0  # hidden and system files (.DS_Store, __MACOSX/…)
    nested: int = 0  # images in subfolders of a class folder (included)
    n_labels: int = 0
    unit: str = "Folders"  # what is matched: class folders, or a dataset's own class names

    @property
    def n_images(self) -> int:
        return sum(count for _, _, count, _ in self.matched)

    @property
    def clean(self) -> bool:
        """Everything found was used, and every label has images."""
        return not (self.unmatched or self.empty or self.non_images or self.loose or self.skipped
                    or self.missing)

    def summary(self) -> str:
        classes = len({label for _, label, count, _ in self.matched if count})
        return (f"{self.n_images} images in {classes} of the model's {self.n_labels} classes"
                + (f" (looked inside {self.root!r})" if self.root else ""))

    def lines(self, limit: int = 8) -> list[str]:
        """The problems, one sentence each, for people."""
        out = []

        def few(items: list[str]) -> str:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        renamed = [f"{f!r} → {lab} ({how})" for f, lab, _, how in self.matched if how != "exact"]
        if renamed:
            out.append(f"{self.unit} matched loosely: {few(renamed)}.")
        if self.unmatched:
            items = [f"{f!r} ({n} {'images' if self.unit != 'Folders' else 'files'}"
                     + (f"; did you mean {s!r}?)" if s else ")")
                     for f, n, s in self.unmatched]
            out.append(f"{self.unit} that match no class of the model, skipped: {few(items)}.")
        if self.empty:
            out.append(f"Empty class folders: {few([repr(e) for e in self.empty])}.")
        if self.missing:
            out.append(f"{len(self.missing)} of the model's classes have no images: {few(self.missing)}.")
        if self.non_images:
            out.append(f"{len(self.non_images)} files are not images, skipped: {few(self.non_images)}.")
        if self.loose:
            out.append(f"{len(self.loose)} files are not inside a class folder, skipped: {few(self.loose)}.")
        if self.skipped:
            out.append(f"Skipped: {few([f'{p} ({why})' for p, why in self.skipped])}.")
        if self.nested:
            out.append(f"{self.nested} images in subfolders of class folders were included with their class.")
        if self.ignored:
            out.append(f"{self.ignored} hidden or system files ignored.")
        return out


# --------------------------------------------------------------------------------------------------
# Listing a zip or a folder safely


def _unsafe(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or ".." in parts
            or "\x00" in name)


def _ignored(path: str) -> bool:
    return any(part.startswith(".") or part.lower() in IGNORED_NAMES for part in path.split("/"))


def list_zip(zf: zipfile.ZipFile, label: str) -> tuple[dict[str, zipfile.ZipInfo], set[str], list]:
    """(files: path → member, directories, skipped) of a zip, refusing unsafe or oversized archives."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise InputError(f"{label}: refused: {len(infos)} members (more than {MAX_MEMBERS})")
    total = 0
    files: dict[str, zipfile.ZipInfo] = {}
    dirs: set[str] = set()
    skipped: list[tuple[str, str]] = []
    for info in infos:
        name = info.filename
        if _unsafe(name):
            raise InputError(f"{label}: refused: member {name!r} has an unsafe path (absolute or '..')")
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise InputError(f"{label}: refused: it expands to more than {MAX_TOTAL_BYTES // 2**30} GB "
                             "(zip bomb guard)")
        if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            ratio = info.file_size // max(info.compress_size, 1)
            raise InputError(f"{label}: refused: member {name!r} compresses {ratio}× (zip bomb guard)")
        path = name.replace("\\", "/").strip("/")
        if not path:
            continue
        if info.is_dir():
            dirs.add(path)
            continue
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            skipped.append((path, "symbolic link"))
        elif info.flag_bits & 0x1:
            skipped.append((path, "encrypted"))
        elif info.file_size > MAX_BYTES:
            skipped.append((path, f"larger than {MAX_BYTES // 2**20} MB"))
        else:
            files[path] = info
    return files, dirs, skipped


def list_folder(root: Path) -> tuple[dict[str, Path], set[str], list]:
    """(files: relative path → path, directories, skipped) under ``root``, never following links."""
    files: dict[str, Path] = {}
    dirs: set[str] = set()
    skipped: list[tuple[str, str]] = []
    for current, subdirs, names in os.walk(root, followlinks=False):
        rel_dir = Path(current).relative_to(root).as_posix()
        for d in list(subdirs):
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            if (Path(current) / d).is_symlink():
                skipped.append((rel, "symbolic link"))
                subdirs.remove(d)
            else:
                dirs.add(rel)
        for name in names:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = Path(current) / name
            if full.is_symlink():
                skipped.append((rel, "symbolic link"))
            elif not full.is_file():
                skipped.append((rel, "not a regular file"))
            elif full.stat().st_size > MAX_BYTES:
                skipped.append((rel, f"larger than {MAX_BYTES // 2**20} MB"))
            else:
                files[rel] = full
            if len(files) > MAX_MEMBERS:
                raise InputError(f"{root}: more than {MAX_MEMBERS} files")
    return files, dirs, skipped


def _children(paths: list[str], dirs: set[str], prefix: str) -> tuple[set[str], list[str]]:
    """Immediate subfolder names and files directly under ``prefix``."""
    sub: set[str] = set()
    here: list[str] = []
    for p in paths:
        if p.startswith(prefix):
            rest = p[len(prefix):]
            if "/" in rest:
                sub.add(rest.split("/", 1)[0])
            else:
                here.append(rest)
    for d in dirs:
        if d.startswith(prefix) and d != prefix.rstrip("/"):
            sub.add(d[len(prefix):].split("/", 1)[0])
    return sub, here


def find_root(paths: list[str], dirs: set[str], labels: list[str]) -> str:
    """The folder whose subfolders are the classes: look through single wrapping folders, keeping
    the level where most subfolders match a label (the outermost one on a tie)."""
    prefix, best, best_score = "", "", -1
    while True:
        sub, here = _children(paths, dirs, prefix)
        score = sum(match_label(s, labels)[0] is not None for s in sub)
        if score > best_score:
            best, best_score = prefix, score
        if len(sub) != 1 or here:
            return best
        prefix = f"{prefix}{next(iter(sub))}/"


# --------------------------------------------------------------------------------------------------
# Image sets


@dataclass
class Batch:
    """Images of a batch: ``arrays`` (N×H×W×3 uint8, the shapes split) or ``images`` (PIL), object
    ``masks`` (N×H×W bool) when known, and ``failed``: position in the batch → why it did not load."""

    images: list[Image.Image | None] | None = None
    arrays: np.ndarray | None = None
    masks: np.ndarray | None = None
    failed: dict[int, str] = field(default_factory=dict)

    def picture(self, position: int) -> Image.Image:
        """The image at ``position`` (one that loaded) as a PIL image."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[position])
        image = self.images[position] if self.images else None
        assert image is not None  # a batch has arrays or images, and this one did not fail
        return image


class ImageSet:
    """A labelled image set: ``targets[i]`` indexes the model's ``labels``; loads in batches."""

    name: str
    labels: list[str]
    targets: np.ndarray
    ids: list[str]
    digest: str
    report: MatchReport | None = None
    has_masks: bool = False
    #: a named box (x0, y0, x1, y1) whose hits are counted, e.g. the shortcut mark's corner, in the
    #: coordinates of the set's square images of side ``image_size``
    reference_box: tuple[str, tuple[int, int, int, int]] | None = None
    image_size: int | None = None
    #: how another process (a Ray worker) opens the same set: a small picklable recipe, or None
    reopen: dict | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, indices) -> Batch:
        raise NotImplementedError

    def image(self, index: int) -> Image.Image:
        """One image as a PIL image (raises InputError when it cannot be decoded)."""
        batch = self.load([index])
        if batch.failed:
            raise InputError(f"{self.ids[index]}: {batch.failed[0]}")
        return batch.picture(0)

    def mask(self, index: int) -> np.ndarray | None:
        masks = self.load([index]).masks if self.has_masks else None
        return masks[0] if masks is not None else None


class FileImages(ImageSet):
    """An ImageFolder zip or folder; files are read and decoded when loaded."""

    def __init__(self, name: str, labels: list[str], entries: list[tuple[str, int]], reader, digest: str,
                 report: MatchReport):
        self.name = name
        self.labels = list(labels)
        self.ids = [path for path, _ in entries]
        self.targets = np.array([t for _, t in entries], dtype=np.int64)
        self._read = reader  # path → bytes
        self.digest = digest
        self.report = report

    def load(self, indices) -> Batch:
        images: list[Image.Image | None] = []
        failed: dict[int, str] = {}
        for pos, index in enumerate(indices):
            path = self.ids[index]
            try:
                images.append(decode_image_bytes(self._read(path), name=path))
            except InputError as exc:
                images.append(None)
                failed[pos] = str(exc)
        return Batch(images=images, failed=failed)


def _scan(source: str, files: dict, dirs: set[str], skipped: list, labels: list[str],
          head) -> tuple[list, MatchReport]:
    report = MatchReport(source=source, n_labels=len(labels))
    kept = {p: v for p, v in files.items() if not _ignored(p)}
    report.ignored = len(files) - len(kept)
    report.skipped = [(p, why) for p, why in skipped if not _ignored(p)]
    dirs = {d for d in dirs if not _ignored(d)}
    paths = sorted(kept)
    root = find_root(paths, dirs, labels)
    report.root = root
    sub, here = _children(paths, dirs, root)
    report.loose = [root + f for f in sorted(here)]
    entries: list[tuple[str, int]] = []
    found_labels: set[int] = set()
    for folder in sorted(sub):
        prefix = f"{root}{folder}/"
        inside = [p for p in paths if p.startswith(prefix)]
        index, how = match_label(folder, labels)
        if index is None:
            if inside or any(d.startswith(prefix) for d in dirs):
                report.unmatched.append((folder, len(inside), suggest_label(folder, labels)))
            continue
        images = []
        for p in inside:
            if looks_like_image(head(p)):
                images.append(p)
            else:
                report.non_images.append(p)
        if not images:
            report.empty.append(folder)
            continue
        report.nested += sum("/" in p[len(prefix):] for p in images)
        report.matched.append((folder, labels[index], len(images), how))
        entries += [(p, index) for p in images]
        found_labels.add(index)
    report.missing = [lab for i, lab in enumerate(labels) if i not in found_labels]
    return entries, report


def open_zip(data: bytes | str | os.PathLike, labels: list[str], *, name: str | None = None) -> FileImages:
    """An ImageFolder zip (file bytes or a path), matched against ``labels``."""
    recipe = {"kind": "zip", "data": data if isinstance(data, bytes) else str(Path(data).resolve()),
              "name": name}
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.stat().st_size > MAX_ZIP_BYTES:
            raise InputError(f"{path.name}: larger than {MAX_ZIP_BYTES // 2**30} GB")
        name = name or path.name
        data = path.read_bytes()
    name = name or "archive.zip"
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{name}: not a readable zip archive ({exc})") from None
    files, dirs, skipped = list_zip(zf, name)
    lock = threading.Lock()

    def read(path: str, limit: int | None = None) -> bytes:
        info = files[path]
        with lock:
            try:
                with zf.open(info) as f:
                    return f.read(MAX_BYTES if limit is None else limit)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
                raise InputError(f"{path}: cannot be read from the zip ({exc})") from None

    def head(path: str) -> bytes:
        try:
            return read(path, 16)
        except InputError:
            return b""

    entries, report = _scan(name, files, dirs, skipped, labels, head)
    digest = hashlib.sha256(data).hexdigest()
    images = FileImages(name, labels, entries, read, digest, report)
    images.reopen = recipe
    return images


def open_folder(path: str | os.PathLike, labels: list[str]) -> FileImages:
    """An ImageFolder folder on disk, matched against ``labels``."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    files, dirs, skipped = list_folder(root)

    def read(rel: str) -> bytes:
        try:
            return files[rel].read_bytes()
        except OSError as exc:
            raise InputError(f"{rel}: cannot be read ({exc.strerror})") from None

    def head(rel: str) -> bytes:
        try:
            with open(files[rel], "rb") as f:
                return f.read(16)
        except OSError:
            return b""

    entries, report = _scan(str(root), files, dirs, skipped, labels, head)
    listing = "\n".join(f"{p}\t{files[p].stat().st_size}\t{files[p].stat().st_mtime_ns}" for p, _ in entries)
    digest = hashlib.sha256(f"{root.resolve()}\n{listing}".encode()).hexdigest()
    images = FileImages(str(root), labels, entries, read, digest, report)
    images.reopen = {"kind": "folder", "path": str(root.resolve())}
    return images


# --------------------------------------------------------------------------------------------------
# The generated shapes split, with masks


def cache_dir() -> Path:
    return Path(os.environ.get("VISLIB_CACHE") or Path.home() / ".cache" / "vislib")


def _generator_version() -> str:
    from .data import shapes

    return hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()[:12]


_RENDERED: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_RENDER_LOCK = threading.Lock()


def render_shapes(split: str = "test", stop: int | None = None, *, mark: bool = False,
                  progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images N×H×W×3 uint8, labels N, masks N×H×W bool) of ``split[:stop]``, every image with the
    shortcut mark if ``mark``. Rendered once, then read from the cache folder (keyed by a hash of the
    generator's source, so a changed generator never serves stale images) and kept in memory."""
    from .data import shapes

    stop = shapes.SPLIT_SIZES[split] if stop is None else min(stop, shapes.SPLIT_SIZES[split])
    version = _generator_version()
    key = (split, stop, mark, version)
    with _RENDER_LOCK:
        for (s, n, m, v), value in _RENDERED.items():
            if (s, m, v) == (split, mark, version) and n >= stop:
                return value[0][:stop], value[1][:stop], value[2][:stop]
    tag = f"shapes-{split}-{'marked' if mark else 'clean'}-{version}"
    folder = cache_dir()
    found = sorted(folder.glob(f"{tag}-*.npz"), key=lambda p: int(p.stem.rsplit("-", 1)[1])) \
        if folder.is_dir() else []
    for path in found:
        if int(path.stem.rsplit("-", 1)[1]) >= stop:
            try:
                with np.load(path) as z:
                    value = (z["images"][:stop], z["labels"][:stop],
                             np.unpackbits(z["masks"][:stop], axis=1)[:, :z["side"] ** 2]
                             .reshape(-1, int(z["side"]), int(z["side"])).astype(bool))
                break
            except (OSError, KeyError, ValueError):
                continue
    else:
        value = _render(split, stop, mark, progress)
        _store(folder / f"{tag}-{stop}.npz", *value)
        _prune(folder, split, mark, keep=folder / f"{tag}-{stop}.npz")
    with _RENDER_LOCK:
        _RENDERED.clear()  # keep one rendering in memory
        _RENDERED[key] = value
    return value


def _render(split, stop, mark, progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .data import shapes

    side = shapes.IMAGE_SIZE
    images = np.empty((stop, side, side, 3), np.uint8)
    labels = np.empty(stop, np.int64)
    masks = np.empty((stop, side, side), bool)
    for i in range(stop):
        sample = shapes.make_sample(split, i, mark=mark)
        images[i], labels[i], masks[i] = np.asarray(sample.image), sample.label, sample.mask
        if progress is not None and (i % 50 == 49 or i == stop - 1):
            progress(i + 1, stop)
    return images, labels, masks


def _store(path: Path, images, labels, masks) -> None:
    """Write the cache file atomically; a read-only or full disk only costs the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, side=np.int64(masks.shape[1]),
                     masks=np.packbits(masks.reshape(len(masks), -1), axis=1))
        os.replace(tmp, path)
    except OSError:
        pass


def _prune(folder: Path, split: str, mark: bool, keep: Path) -> None:
    """Remove this split's older cache files (another generator version, or fewer images)."""
    if not keep.is_file():
        return
    for path in folder.glob(f"shapes-{split}-{'marked' if mark else 'clean'}-*.npz"):
        if path != keep:
            try:
                path.unlink()
            except OSError:
                pass


class ShapesImages(ImageSet):
    """The generated shapes split with exact object masks, its classes matched to the model's labels.

    ``mark=True`` stamps the shortcut mark (:func:`vislib.data.shapes.apply_mark`) on every image: the
    test for a model that learned it. The mark's corner is the :attr:`reference_box`, so evaluation
    counts the maps that point there.
    """

    has_masks = True

    def __init__(self, labels: list[str], *, split: str = "test", limit: int | None = None,
                 mark: bool = False, progress=None):
        from .data import shapes

        images, classes, masks = render_shapes(split, limit, mark=mark, progress=progress)
        self.labels = list(labels)
        self.name = f"shapes {split}" + (" (every image marked)" if mark else "")
        report = MatchReport(source=self.name, n_labels=len(labels), unit="Shapes classes")
        lookup = {}
        for c, cname in enumerate(shapes.CLASSES):
            index, how = match_label(cname, self.labels)
            count = int((classes == c).sum())
            if index is None:
                report.unmatched.append((cname, count, None))
            else:
                lookup[c] = index
                report.matched.append((cname, self.labels[index], count, how))
        if not lookup:
            raise InputError(f"the model's classes ({', '.join(self.labels[:5])}…) include none of the "
                             f"shapes classes ({', '.join(shapes.CLASSES)})")
        found = set(lookup.values())
        report.missing = [lab for i, lab in enumerate(self.labels) if i not in found]
        keep = np.flatnonzero(np.isin(classes, list(lookup)))
        self._images, self._masks = images, masks
        self._rows = keep
        self.targets = np.array([lookup[int(c)] for c in classes[keep]], dtype=np.int64)
        self.ids = [f"{split}/{i:05d}" for i in keep]
        self.report = report
        self.mark = mark
        self.digest = hashlib.sha256(f"{self.name}|{len(images)}|{_generator_version()}".encode()).hexdigest()
        self.reference_box = ("mark corner", shapes.MARK_BOX)
        self.image_size = shapes.IMAGE_SIZE
        self.reopen = {"kind": "shapes", "split": split, "limit": limit, "mark": mark}

    def load(self, indices) -> Batch:
        rows = self._rows[np.asarray(indices, dtype=np.int64)]
        return Batch(arrays=self._images[rows], masks=self._masks[rows])


SHAPES_SOURCES = {"shapes": False, "shapes+mark": True}


def open_dataset(source, labels: list[str], *, limit: int | None = None, name: str | None = None,
                 progress=None) -> ImageSet:
    """``source``: ``"shapes"`` (the generated test split), ``"shapes+mark"`` (every image with the
    shortcut mark), a folder, a ``.zip`` path, or zip bytes. ``limit`` keeps the first N images
    (the shapes split: the first N indices; a folder: N images spread evenly over the sorted list)."""
    if isinstance(source, str) and source in SHAPES_SOURCES:
        return ShapesImages(labels, limit=limit, mark=SHAPES_SOURCES[source], progress=progress)
    if isinstance(source, (bytes, bytearray, memoryview)):
        images = open_zip(bytes(source), labels, name=name)
    else:
        path = Path(source)
        if path.is_dir():
            images = open_folder(path, labels)
        elif path.is_file():
            images = open_zip(path, labels, name=name)
        else:
            raise InputError(f"{source}: no such folder or zip file (or use 'shapes' for the generated "
                             "test split)")
    if not len(images):
        problems = " ".join(images.report.lines()) if images.report else ""
        raise InputError(f"{images.name}: no image matches the model's classes. {problems}")
    return subset(images, limit)


def subset(images: FileImages, limit: int | None) -> FileImages:
    """At most ``limit`` images, spread evenly over the list (so every class keeps some)."""
    if limit is None or limit >= len(images):
        return images
    keep = np.unique(np.linspace(0, len(images) - 1, max(1, limit)).round().astype(int))
    images.ids = [images.ids[i] for i in keep]
    images.targets = images.targets[keep]
    if images.reopen is not None:
        images.reopen = {**images.reopen, "limit": limit}
    return images
