"""A report as data: a title and a list of typed blocks, rendered to Markdown and to HTML.

The study report builds one :class:`Document` and renders it twice, through the Jinja2
templates ``templates/report.md`` and ``templates/report.html``, so the two files carry the same
content by construction and each format's escaping lives in one place: Jinja2's autoescape for
HTML, :func:`markdown_text` for Markdown (text from run directories, such as a run's name, can
hold characters that either format would read as markup).
"""

from __future__ import annotations

import base64
import mimetypes
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import jinja2

__all__ = ["Bullets", "Document", "Figure", "Heading", "Paragraph", "Table", "markdown_text",
           "render_html", "render_markdown"]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2
    kind: ClassVar[str] = "heading"

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 6:
            raise ValueError(f"a heading's level is 1 to 6, got {self.level}")


@dataclass(frozen=True)
class Paragraph:
    text: str
    kind: ClassVar[str] = "paragraph"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    kind: ClassVar[str] = "bullets"


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    kind: ClassVar[str] = "table"

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"a table row has {len(row)} cells for {len(self.header)} "
                                 f"columns: {row}")


@dataclass(frozen=True)
class Figure:
    path: Path     # relative to the report's directory, so report.md works wherever it is moved
    caption: str
    kind: ClassVar[str] = "figure"

    @property
    def alt(self) -> str:
        return self.path.stem


Block = Heading | Paragraph | Bullets | Table | Figure


@dataclass(frozen=True)
class Document:
    title: str
    blocks: tuple[Block, ...]


def render_markdown(document: Document) -> str:
    """The document as Markdown (CommonMark with GitHub's pipe tables)."""
    return _template("report.md").render(document=document)


def render_html(document: Document, root: str | Path) -> str:
    """The document as one self-contained HTML page: figures under ``root`` are embedded.

    Embedded, so the page can be mailed or archived on its own.
    """
    root = Path(root)
    return _template("report.html").render(document=document,
                                           embed=lambda path: _data_uri(root / path))


# Characters Markdown reads as markup wherever they stand, each with its literal spelling: a
# backslash for backslash escapes, code spans, emphasis, links and images, table cells and
# headings' closing marks; an entity where a backslash is not understood by every renderer
# (raw HTML and autolinks, entities themselves, GFM's strikethrough). ``_`` only at a word's edge
# (inside a word it is never emphasis) and ``&`` only where it would start an entity, so that
# ordinary names and prose read unchanged in the Markdown source.
_INLINE = re.compile(r"[\\`*\[\]|#<~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])|&(?=#?[0-9A-Za-z]+;)")
_ENTITIES = {"<": "&lt;", "&": "&amp;", "~": "&#126;"}
# What would open a block (quote, list item) at the start of a paragraph or list item.
_BLOCK_START = re.compile(r"^(>|[+-](?=\s|$)|\d+(?=[.)](\s|$)))")


def markdown_text(text: str, *, block_start: bool = False) -> str:
    """``text`` escaped to read literally in Markdown; lines joined, so it stays one line.

    ``block_start``: the text opens a paragraph or list item, where a leading ``>``, ``-``, ``+``
    or ``1.`` would start a quote or a list.
    """
    text = _INLINE.sub(_literal, " ".join(text.splitlines()))
    if block_start:
        text = _BLOCK_START.sub(lambda match: match.group() + "\\" if match.group().isdigit()
                                else "\\" + match.group(), text)
    return text


def _literal(match: re.Match) -> str:
    return _ENTITIES.get(match.group(), "\\" + match.group())


def _data_uri(path: Path) -> str:
    mime, _ = mimetypes.guess_type(path.name)
    if mime is None or not mime.startswith("image/"):
        raise ValueError(f"{path} is not an image file that a page can embed")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("rnnreg.study", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)
    environment.filters["md"] = markdown_text
    environment.filters["md_block"] = lambda text: markdown_text(text, block_start=True)
    environment.filters["url"] = lambda path: quote(Path(path).as_posix())
    return environment


def _template(name: str) -> jinja2.Template:
    return _environment().get_template(name)
