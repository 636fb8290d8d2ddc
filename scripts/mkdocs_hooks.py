"""mkdocs hook: the README's guides as documentation pages, without copying their text.

A page in ``docs/`` says where a README section goes with a comment on a line of its own::

    <!-- readme: intro -->              the title and text before the first "## " heading
    <!-- readme: ## The dashboard -->   that "## " section, its "###" subsections included
    <!-- readme: rest -->               every "## " section that no page names (new ones land here)
    <!-- file: CHANGELOG.md -->         a whole file of the checkout

Links to a heading of another page (``[..](#use-your-own-model)``) and to a file that a page shows
(``[..](CHANGELOG.md)``) point at that page. A name that
matches no section is an error, so a renamed README heading fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"^<!-- (readme|file): (.+?) -->$", re.M)


def _sections() -> dict[str, str]:
    """"intro" and every "## " heading of README.md → its text (headings inside code fences ignored)."""
    sections, name, lines, fenced = {}, "intro", [], False
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            sections[name] = "\n".join(lines).strip() + "\n"
            name, lines = line.strip(), []
        lines.append(line)
    sections[name] = "\n".join(lines).strip() + "\n"
    return sections


def _slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.lstrip("#").strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


_PLACED: dict[str, str] = {}  # README section → the page (src path) that shows it
_FILES: dict[str, str] = {}  # a checkout file shown whole → its page


def on_files(files, config):
    """Which page shows which section (read before any page is rendered, for the links)."""
    _PLACED.clear()
    _FILES.clear()
    sections = _sections()
    for file in files.documentation_pages():
        for kind, name in MARK.findall(Path(file.abs_src_path).read_text(encoding="utf-8")):
            if kind == "readme" and name != "rest":
                if name not in sections:
                    raise PluginError(f"{file.src_path}: README.md has no section {name!r} (one of: "
                                      f"{', '.join(sections)})")
                _PLACED[name] = file.src_uri
            elif kind == "file":
                _FILES[name] = file.src_uri
    for file in files.documentation_pages():
        if "<!-- readme: rest -->" in Path(file.abs_src_path).read_text(encoding="utf-8"):
            for name in sections:
                _PLACED.setdefault(name, file.src_uri)
    return files


def on_page_markdown(markdown, page, config, files):
    sections = _sections()

    def replace(match: re.Match) -> str:
        kind, name = match.groups()
        if kind == "file":
            path = ROOT / name
            if not path.is_file():
                raise PluginError(f"{page.file.src_path}: no file {name}")
            return path.read_text(encoding="utf-8")
        if name == "rest":
            rest = [text for key, text in sections.items() if _PLACED.get(key) == page.file.src_uri
                    and f"<!-- readme: {key} -->" not in markdown]
            return "\n".join(rest) or "Every guide of the README has its own page."
        return sections[name]

    text = MARK.sub(replace, markdown)
    here = {_slug(h): src for h, src in _PLACED.items() if h != "intro"}
    depth = page.file.src_uri.count("/")

    def link(match: re.Match) -> str:
        slug = match.group(1)
        target = here.get(slug)
        if target is None or target == page.file.src_uri:
            return match.group(0)
        return f"]({'../' * depth}{target}#{slug})"

    text = re.sub(r"\]\(#([\w-]+)\)", link, text)
    for name, target in _FILES.items():
        text = text.replace(f"]({name})", f"]({'../' * depth}{target})")
    return text
