"""The report's document model, what it says each strategy samples, and whole reports.

Markdown is checked against an independent renderer (Python-Markdown, installed with
TensorBoard): both files are read back as HTML with html.parser and must carry the same text.
What each strategy samples is checked against the strategy table (rnnreg.nn.strategies), while
the report reads it from the shapes of the masks the model draws.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure as MatplotlibFigure
from test_study import TINY_FLAGS

from rnnreg import cli
from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.nn import Schedule
from rnnreg.nn.strategies import STRATEGIES
from rnnreg.study.document import (
    Bullets,
    Document,
    Figure,
    Heading,
    Paragraph,
    Table,
    markdown_text,
    render_html,
    render_markdown,
)
from rnnreg.study.report import write_report
from rnnreg.study.sampling import masks, named_schedules, schedules, stack_steps

FRESH, SEQUENCE, WINDOW = Schedule.STEP, Schedule.SEQUENCE, Schedule.WINDOW

# Every character either format could read as markup, at the edges of words and inside them.
NASTY = "lstm-<b>x</b>|y & z &amp; *e* _f_ [g](h) \\ `i` # ~j~ snake_case"


class _Blocks(HTMLParser):
    """An HTML page as (kind, text) pairs: headings, paragraphs (captions too), list items,
    header and body cells, and images by their alt text, in page order."""

    _TEXT = {"h1", "h2", "h3", "h4", "h5", "h6", "p", "figcaption", "li", "th", "td"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._open: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.blocks.append(("img", dict(attrs)["alt"]))
        elif tag in self._TEXT:
            self._open.append((tag, []))

    def handle_endtag(self, tag):
        if tag in self._TEXT:
            kind, parts = self._open.pop()
            text = " ".join("".join(parts).split())
            if text:  # Python-Markdown wraps an image in a paragraph of its own
                self.blocks.append(("p" if kind == "figcaption" else kind, text))

    def handle_data(self, data):
        if self._open:
            self._open[-1][1].append(data)


def _blocks(page: str) -> list[tuple[str, str]]:
    parser = _Blocks()
    parser.feed(page)
    parser.close()
    return parser.blocks


def _markdown_as_html(text: str) -> str:
    markdown = pytest.importorskip("markdown")
    return markdown.markdown(text, extensions=["tables"])


def _document(figure: Path) -> Document:
    return Document(f"study {NASTY}", (
        Heading(f"Title {NASTY}", 1),
        Paragraph(NASTY),
        Paragraph("- not a list item"),
        Paragraph("1. not a numbered one"),
        Paragraph("> not a quote\nand a second line"),
        Heading(NASTY, 3),
        Bullets((NASTY, "- leading dash", "plain")),
        Table(("mask", NASTY), (("a|b", "<td>"), ("-1.5", "_x_"))),
        Figure(figure.relative_to(figure.parent.parent), f"caption {NASTY}"),
    ))


@pytest.fixture
def figure(tmp_path: Path) -> Path:
    path = tmp_path / "figures" / "a figure.png"
    path.parent.mkdir()
    drawing = MatplotlibFigure(figsize=(1, 1))
    drawing.add_subplot().plot([0, 1])
    drawing.savefig(path)
    return path


def test_markdown_and_html_carry_the_same_text(figure):
    document = _document(figure)
    page = render_html(document, figure.parent.parent)
    from_markdown = _blocks(_markdown_as_html(render_markdown(document)))
    from_html = _blocks(page)
    assert from_html == from_markdown
    # ...and that text is the document's own, character for character.
    assert from_html[:7] == [("h1", f"Title {NASTY}"), ("p", NASTY), ("p", "- not a list item"),
                             ("p", "1. not a numbered one"),
                             ("p", "> not a quote and a second line"), ("h3", NASTY),
                             ("li", NASTY)]
    cells = [text for kind, text in from_html if kind in ("th", "td")]
    assert cells == ["mask", NASTY, "a|b", "<td>", "-1.5", "_x_"]
    assert from_html[-2:] == [("img", "a figure"), ("p", f"caption {NASTY}")]


def test_html_escapes_text_and_embeds_figures(figure):
    page = render_html(_document(figure), figure.parent.parent)
    assert "<b>" not in page and "<td><td>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;|y &amp; z &amp;amp;" in page
    assert page.count('src="data:image/png;base64,') == 1 and "figures/" not in page
    assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</body></html>\n")


def test_markdown_escapes_only_what_would_be_markup(figure):
    markdown = render_markdown(_document(figure))
    # Table rows keep their column count: every | inside a cell is escaped.
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 4
    assert all(line.replace("\\|", "").count("|") == 3 for line in rows)
    assert "![a figure](figures/a%20figure.png)" in markdown
    # Ordinary prose and names read unchanged in the source.
    for plain in ("recurrent_only", "h(t-1) -> h(t)", "Gal & Ghahramani 2016", "p=0.5 ± 0.1"):
        assert markdown_text(plain, block_start=True) == plain
    assert markdown.endswith("*\n") and "\n\n\n" not in markdown


def test_blocks_refuse_malformed_input():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        Table(("a", "b", "c"), (("1", "2"),))
    with pytest.raises(ValueError, match="level is 1 to 6"):
        Heading("x", 7)


def test_figures_must_be_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an image"):
        render_html(Document("t", (Figure(Path("notes.txt"), "c"),)), tmp_path)


# --------------------------------------------------------------------------- what is sampled


def _model(**fields) -> LanguageModel:
    config = Config(hidden_size=6, num_layers=2, **fields)
    return LanguageModel(7, config)


def _expected(name: str) -> dict[str, str]:
    """What the strategy table says its masks are, written from its fields alone."""
    chosen = STRATEGIES[name]
    each = SEQUENCE if chosen.variational else FRESH
    expected = {placement: each for placement in ("input", "between", "output")
                if placement in chosen.placements}
    if "recurrent" in chosen.placements:
        expected["recurrent"] = WINDOW if chosen.recurrent_mask == "batch" else each
    if "weight" in chosen.placements:
        expected["weight"] = WINDOW
    for keyword in chosen.zoneout:
        expected[keyword.replace("_", " ")] = each
    return expected


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_what_each_strategy_samples_matches_the_strategy_table(name):
    found = {mask: schedule for mask, (_, schedule) in
             named_schedules(_model(strategy=name,
                                    strategy_p=0.0 if name == "none" else 0.5)).items()}
    assert found == _expected(name)


def test_zoneout_rows_follow_the_rate_each_keyword_sets():
    """Only the cell rate set: the one zoneout row is the cell's (the pair is (hidden, cell))."""
    found = named_schedules(_model(strategy="zoneout", strategy_p=0.5, zoneout_hidden=0.0))
    assert [name for name in found if name.startswith("zoneout")] == ["zoneout cell"]
    found = named_schedules(_model(strategy="none", zoneout_hidden=0.1))
    assert list(found) == ["zoneout hidden"]


def test_embedding_words_are_one_mask_per_window():
    found = named_schedules(_model(strategy="zaremba", strategy_p=0.5, embedding_dropout=0.1))
    assert found["words"][1] == WINDOW and list(found)[0] == "words"


def test_measuring_leaves_the_random_state_alone():
    model = _model(strategy="zoneout", strategy_p=0.5)
    state = torch.random.get_rng_state()
    schedules(model)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", ["zoneout", "awd", "variational_batch", "naive"])
def test_stacked_steps_redraw_every_mask_but_the_per_window_ones(name):
    model = _model(strategy=name, strategy_p=0.5)
    keep = {mask.path for mask, schedule in schedules(model) if schedule == WINDOW}
    draws = [model.sample_masks(1, 3) for _ in range(5)]
    stacked = stack_steps(draws, keep)
    first = list(masks(draws[0]))
    assert [mask.path for mask in masks(stacked)] == [mask.path for mask in first]
    for mask in masks(stacked):
        singles = [dict((m.path, m.tensor) for m in masks(draw))[mask.path] for draw in draws]
        expected = singles[0] if mask.path in keep else torch.cat(singles)
        assert torch.equal(mask.tensor, expected), mask.path
    if name == "zoneout":  # zoneout's factors are redrawn too, for the cell and the hidden state
        assert {mask.name for mask in masks(stacked)} == {"zoneout hidden", "zoneout cell"}
        assert all(mask.tensor.size(0) == 5 for mask in masks(stacked))


@dataclass(frozen=True)
class _Record:
    """A mask record with a placement the report has never heard of."""

    input: torch.Tensor | None
    sideways: tuple[torch.Tensor | None, ...]
    pairs: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]


class _NewPlacement:
    def sample_masks(self, steps: int, batch_size: int) -> _Record:
        return _Record(torch.ones(steps, batch_size, 4),
                       (torch.ones(1, batch_size, 4), torch.ones(1, batch_size, 4)),
                       ((None, torch.ones(3, 3)),))

    def schedule(self, field: str) -> Schedule:
        return {"input": FRESH, "sideways": SEQUENCE, "pairs": WINDOW}[field]


def test_a_new_placement_appears_without_naming_it():
    found = named_schedules(_NewPlacement())
    assert {name: schedule for name, (_, schedule) in found.items()} == {
        "input": FRESH, "sideways": SEQUENCE, "pairs 1": WINDOW}
    assert [order for order, _ in found.values()] == sorted(order for order, _ in found.values())


def test_a_record_of_something_else_is_refused():
    with pytest.raises(TypeError, match="holds list"):
        list(masks(_Record(None, [torch.ones(1)], ())))


# --------------------------------------------------------------------------- a whole report


@pytest.fixture(scope="module")
def zoneout_study(tmp_path_factory, module_corpus) -> Path:
    """A real study of zaremba and zoneout, plus an unfinished run whose name is markup."""
    out = tmp_path_factory.mktemp("study") / "study"
    assert cli.main(["compare", "--strategies", "zaremba,zoneout", "--rates", "0.5",
                     "--cells", "lstm", "--seeds", "1", "--data-dir", str(module_corpus),
                     "--out", str(out), *TINY_FLAGS]) == 0
    odd = out / "runs" / ODD_NAME
    shutil.copytree(out / "runs" / "lstm-zaremba-p0.5-s1", odd)
    RunDir(odd).truncate_metrics(lambda record: record.get("event") != "final")
    write_report(out, data_dir=module_corpus)
    return out


ODD_NAME = "lstm-<b>|x & y"


def _tables(blocks: list[tuple[str, str]]) -> list[list[list[str]]]:
    """The cells of every table, row by row, from a page's blocks: a run of header cells
    opens a table, its length is the row length of the body cells after it."""
    tables: list[list[list[str]]] = []
    previous = None
    for kind, text in blocks:
        if kind == "th":
            if previous != "th":
                tables.append([[]])
            tables[-1][0].append(text)
        elif kind == "td":
            rows = tables[-1]
            if len(rows) == 1 or len(rows[-1]) == len(rows[0]):
                rows.append([])
            rows[-1].append(text)
        previous = kind
    return tables


@pytest.mark.slow
def test_report_files_carry_the_same_content(zoneout_study):
    markdown = (zoneout_study / "report.md").read_text(encoding="utf-8")
    page = (zoneout_study / "report.html").read_text(encoding="utf-8")
    blocks = _blocks(page)
    assert blocks == _blocks(_markdown_as_html(markdown))
    assert ("p", f"No final record (still running, interrupted or diverged): {ODD_NAME}.") \
        in blocks
    assert "lstm-&lt;b&gt;|x &amp; y" in page and "lstm-&lt;b>\\|x & y" in markdown
    assert [kind for kind, _ in blocks].count("img") == page.count("data:image/png;base64,")


@pytest.mark.slow
def test_report_says_what_zoneout_samples(zoneout_study):
    tables = _tables(_blocks((zoneout_study / "report.html").read_text(encoding="utf-8")))
    (sampled,) = [table for table in tables if table[0][0] == "mask"]
    assert sampled == [["mask", "zaremba", "zoneout"],
                       ["input", FRESH, "–"],
                       ["between", FRESH, "–"],
                       ["output", FRESH, "–"],
                       ["zoneout hidden", "–", FRESH],
                       ["zoneout cell", "–", FRESH]]


def _text(study: Path) -> str:
    return (study / "report.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_names_the_corpus_by_checksum_not_by_this_machines_path(zoneout_study,
                                                                      module_corpus):
    page = (zoneout_study / "report.html").read_text(encoding="utf-8")
    for text in (_text(zoneout_study), page):
        assert str(module_corpus) not in text and str(module_corpus.parent) not in text
        for split in ("train", "valid", "test"):
            md5 = hashlib.md5((module_corpus / f"{split}.txt").read_bytes()).hexdigest()
            assert f"{split}.txt MD5 {md5}" in text
        assert f"data: {module_corpus.name} (" in text


@pytest.mark.slow
def test_report_is_titled_by_what_it_compares_and_counts_in_words(zoneout_study):
    blocks = _blocks((zoneout_study / "report.html").read_text(encoding="utf-8"))
    assert blocks[0] == ("h1", "Dropout study: zaremba and zoneout (LSTM)")
    (held,) = [text for kind, text in blocks if text.startswith("Held equal")]
    assert "2 layers of 8 units, 1 epoch, batch 4" in held and "epochs" not in held


@pytest.mark.slow
def test_a_one_rate_study_draws_no_rate_curve_and_says_why(zoneout_study):
    blocks = _blocks((zoneout_study / "report.html").read_text(encoding="utf-8"))
    assert not (zoneout_study / "figures" / "rates-lstm.png").exists()
    assert not any(kind == "img" and text.startswith("rates") for kind, text in blocks)
    heading = blocks.index(("h2", "Perplexity against dropout rate"))
    assert blocks[heading + 1] == ("p", "lstm: no figure, as each strategy ran at one rate only "
                                        "(p = 0.5): there is no curve against the rate to draw. "
                                        "The tables above compare the strategies.")
    assert ("h2", "Where each strategy drops") in blocks


@pytest.mark.slow
def test_without_checkpoints_the_hidden_state_figure_is_kept_and_said_so(zoneout_study,
                                                                         tmp_path):
    study = Path(shutil.copytree(zoneout_study, tmp_path / "kept"))
    for run in (study / "runs").iterdir():  # what results/ keeps: config and metrics only
        shutil.rmtree(RunDir(run).checkpoint_dir)
        RunDir(run).vocab_path.unlink()
    figure = study / "figures" / "hidden-states.png"
    drawn = figure.read_bytes()
    write_report(study)
    assert figure.read_bytes() == drawn
    blocks = _blocks((study / "report.html").read_text(encoding="utf-8"))
    heading = blocks.index(("h2", "Hidden states on real text"))
    assert blocks[heading + 1] == ("img", "hidden-states")
    assert blocks[heading + 2][1].startswith("Kept from an earlier writing of this report")

    figure.unlink()
    write_report(study)
    blocks = _blocks((study / "report.html").read_text(encoding="utf-8"))
    heading = blocks.index(("h2", "Hidden states on real text"))
    assert blocks[heading + 1][1].startswith("Not drawn: it needs a trained model")
    assert str(study) not in _text(study)


@pytest.mark.slow
def test_a_missing_corpus_skips_the_hidden_states_without_naming_its_path(zoneout_study,
                                                                          tmp_path):
    study = Path(shutil.copytree(zoneout_study, tmp_path / "moved"))
    missing = tmp_path / "no-corpus-here"
    write_report(study, data_dir=missing)
    blocks = _blocks((study / "report.html").read_text(encoding="utf-8"))
    heading = blocks.index(("h2", "Hidden states on real text"))
    assert blocks[heading + 1][1].startswith("Skipped: the corpus's valid split could not be read")
    assert str(missing) not in _text(study)
