"""Tests of the manuals corpus builder (train/data/manuals_corpus.py) and of
`--data=builtin:manuals`, on small pages written here (not the Debian packages)."""

import gzip
import json
import os
import re
import zlib

import pytest

from train.data import manuals_corpus as mc
from train.data import text


# --- Cleaning ---------------------------------------------------------------------------


def test_html_keeps_prose_and_drops_code_tables_and_navigation():
    page = """<html><head><title>Title words here</title><style>p {}</style></head>
    <body><div class="related"><p>Previous topic is this one</p></div>
    <p>Call <code>open()</code> to read&nbsp;a file &amp; close it.<br>Then stop.</p>
    <pre>for x in y: print(x)</pre>
    <ul><li>An item with words<p>and a nested paragraph</p></li></ul>
    <table><tr><td><p>A cell of the table</p></td></tr></table>
    <dl><dt>term</dt><dd>The definition of the term.</dd></dl>
    <div class="para">A Publican paragraph.</div>
    <p>Unclosed last paragraph</body></html>"""
    assert mc.html_paragraphs(page) == [
        "Call open() to read\xa0a file & close it. Then stop.".replace("\xa0", " "),
        "An item with words", "and a nested paragraph", "The definition of the term.",
        "A Publican paragraph.", "Unclosed last paragraph"]


def test_pod_keeps_ordinary_paragraphs_without_formatting_codes():
    pod = ("=head1 NAME\n\nperlfoo - what it is\n\n=head1 DESCRIPTION\n\n"
           "Use B<bold> and C<< $x->method >> with I<B<nested>> codes E<gt> here, see\n"
           "L<perlsyn/Loops> and L<the manual|perlop>.X<index entry>\n\n"
           "    my $verbatim = 1;\n\n=begin html\n\n<p>Only for HTML</p>\n\n=end html\n\n"
           "=item * label\n\nThe item's text.\n\n=cut\n")
    assert mc.pod_paragraphs(pod) == [
        "perlfoo - what it is",
        "Use bold and $x->method with nested codes > here, see perlsyn Loops and the manual.",
        "The item's text."]


@pytest.mark.parametrize("paragraph, expected", [
    ("One sentence. Two sentences! A third? 4 starts with a digit.",
     ["One sentence.", "Two sentences!", "A third?", "4 starts with a digit."]),
    ('Run it, e.g. With care. Then "quote." Done (see above.) Next.',
     ["Run it, e.g. With care.", 'Then "quote."', "Done (see above.)", "Next."]),
    ("Version 3.11 is here. lower case after a period. stays",
     ["Version 3.11 is here. lower case after a period. stays"]),
])
def test_sentences(paragraph, expected):
    assert mc.sentences(paragraph) == expected


def test_is_prose_drops_short_lines_and_code():
    assert mc.is_prose("This is a real sentence.")
    assert not mc.is_prose("Too short here.")
    assert not mc.is_prose("x = f(a[0], b[1]) + {2: 3};")


def test_normalise_gives_nfc_and_single_plain_spaces():
    assert mc.normalise("cafe\u0301\u00a0 au\tlait ") == "caf\u00e9 au lait"


# --- Building a corpus from small source trees -------------------------------------------


def _write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)


@pytest.fixture
def sources(tmp_path):
    """Two sources: 60 HTML pages (one excluded index) and 30 POD documents; every page
    has two sentences of its own and one that every page of its source shares."""
    html_root, pod_root = tmp_path / "html", tmp_path / "pod"
    for page in range(60):
        _write(str(html_root / f"section{page % 3}" / f"page{page}.html"),
               f"<p>The page number {page} says hello to you. It has a second sentence "
               f"{page} too.</p><p>Every HTML page repeats this line.</p>")
    _write(str(html_root / "genindex.html"), "<p>An index page that is never read.</p>")
    for document in range(30):
        _write(str(pod_root / f"perl{document}.pod"),
               f"=head1 NAME\n\nThe document number {document} talks about Perl.\n\n"
               f"    code();\n\nEvery POD document repeats this line.\n")
    return (mc.Source("web", "web-doc", "MIT", str(html_root), ("**/*.html",), "html",
                      exclude=r"^genindex"),
            mc.Source("perl", "perl-doc", "Artistic", str(pod_root), ("*.pod",), "pod"))


def _lines(directory, split):
    with gzip.open(mc.corpus_path(str(directory), split), "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def test_build_splits_by_page_keeps_each_line_once_and_counts(sources, tmp_path):
    statistics = mc.build_corpus(str(tmp_path / "out"), sources)
    lines = {split: _lines(tmp_path / "out", split) for split in mc.SPLITS}
    every = [line for split in mc.SPLITS for line in lines[split]]
    assert len(every) == len(set(every))  # no line twice, in or across splits
    assert "An index page that is never read." not in every
    assert every.count("Every HTML page repeats this line.") == 1
    # 60 pages x 2 own sentences + 1 shared; 30 documents x 1 + 1 shared (NAME is prose).
    assert len(every) == 60 * 2 + 1 + 30 + 1
    for page in range(60):  # both sentences of a page land in its page's split
        split = mc.split_of("web", f"section{page % 3}/page{page}.html")
        assert f"The page number {page} says hello to you." in lines[split]
        assert f"It has a second sentence {page} too." in lines[split]
    recorded = json.loads((tmp_path / "out" / "sources.json").read_text())
    assert recorded == statistics
    assert [s["name"] for s in recorded] == ["web", "perl"]
    for split in mc.SPLITS:
        assert sum(s["splits"][split]["lines"] for s in recorded) == len(lines[split])
        assert sum(s["splits"][split]["words"] for s in recorded) == sum(
            len(line.split()) for line in lines[split])
    assert sum(s["splits"][split]["pages"] for s in recorded for split in mc.SPLITS) == 90


def _page_of(line):
    """The page (source, path) a numbered fixture line comes from, else None."""
    page = re.match(r"The page number (\d+) says", line) or re.match(
        r"It has a second sentence (\d+) too", line)
    if page:
        number = int(page.group(1))
        return "web", f"section{number % 3}/page{number}.html"
    document = re.match(r"The document number (\d+) talks", line)
    return ("perl", f"perl{document.group(1)}.pod") if document else None


def test_training_pages_interleave_the_sources_and_held_out_pages_keep_their_order(
        sources, tmp_path):
    mc.build_corpus(str(tmp_path / "out"), sources)
    for split in mc.SPLITS:
        pages = []
        for line in _lines(tmp_path / "out", split):
            page = _page_of(line)
            if page and (not pages or pages[-1] != page):
                pages.append(page)
        assert len(pages) == len(set(pages))  # a page's lines stay together
        if split == "train":  # in the order of a CRC-32 of "order/<source>/<path>"
            assert pages == sorted(pages, key=lambda page: zlib.crc32(
                f"order/{page[0]}/{page[1]}".encode()))
            sources_in_order = [source for source, _ in pages]
            first_perl = sources_in_order.index("perl")
            assert "web" in sources_in_order[first_perl:]  # interleaved, not one block
        else:  # the sources' order: every web page before every perl document
            names = [source for source, _ in pages]
            assert names == sorted(names, key=["web", "perl"].index)


def test_build_is_deterministic(sources, tmp_path):
    mc.build_corpus(str(tmp_path / "a"), sources)
    mc.build_corpus(str(tmp_path / "b"), sources)
    for split in mc.SPLITS:
        assert ((tmp_path / "a" / f"{split}.txt.gz").read_bytes()
                == (tmp_path / "b" / f"{split}.txt.gz").read_bytes())


def test_split_of_sends_about_the_held_out_share_of_pages():
    splits = [mc.split_of("linux", f"page{n}.html") for n in range(20000)]
    for split in ("valid", "test"):
        assert abs(splits.count(split) / len(splits) - mc.HELD_OUT_PERCENT / 100) < 0.004


def test_a_missing_package_is_named(tmp_path, capsys, monkeypatch):
    missing = mc.Source("gone", "gone-doc", "MIT", str(tmp_path / "nowhere"), ("*.html",),
                        "html")
    monkeypatch.setattr(mc, "SOURCES", (missing,))
    with pytest.raises(SystemExit) as exit_info:
        mc.main(["--output_dir", str(tmp_path / "out")])
    assert "apt-get install gone-doc" in str(exit_info.value)
    assert not (tmp_path / "out").exists()


# --- Reading it through --data=builtin:manuals -----------------------------------------


def test_builtin_manuals_reads_the_built_corpus(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "DEFAULT_OUTPUT_DIR", str(tmp_path / "built"))
    with pytest.raises(ValueError, match="make manuals-corpus"):
        text.load_text_splits("builtin:manuals")
    mc.build_corpus(str(tmp_path / "built"), sources)
    splits = text.load_text_splits("builtin:manuals")
    for split in mc.SPLITS:
        read = [line.decode() for line in getattr(splits, split).as_numpy_iterator()]
        assert read == _lines(tmp_path / "built", split)


def test_an_unknown_builtin_corpus_lists_the_known_ones():
    with pytest.raises(ValueError, match="builtin:en, builtin:es and builtin:manuals"):
        text.load_text_splits("builtin:fr")
