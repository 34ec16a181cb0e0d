"""Builds `builtin:manuals`: English prose from the free software manuals Debian ships.

A second built-in corpus, about ten times the Bible's English side, for experiments that
need plentiful text (the paper's capacity claim). It is built from installed Debian
packages rather than shipped (about 25 MB compressed):

    apt-get install $(python -m train.data.manuals_corpus --packages)
    python -m train.data.manuals_corpus            # writes train/data/manuals/

(`make manuals-corpus` does both.) Each source is a domain of its own (the Linux kernel,
Python, Django, SciPy, PostgreSQL, Perl, Erlang, Octave, Git, CMake, Debian
administration, GNU coding style); `SOURCES` records each one's package and licence.
Cleaning keeps the prose of each page: the text of HTML paragraphs,
list items and definitions (not code blocks, tables, navigation or indexes), and POD's
ordinary paragraphs (not verbatim blocks), with inline markup dropped and its words kept.
Paragraphs are cut into sentences, one a line; lines with fewer than `MIN_WORDS` words or
that look like code are dropped, and every line is kept once (its first occurrence in the
order below), so no held-out line repeats a training line. Splits are by document (a
page): a CRC-32 of the source name and the page's path sends `HELD_OUT_PERCENT` of pages
to valid and as many to test. The training split's pages are written in the order of
another such hash, so that the sources interleave: a training stream read in file order
and shuffled in a window of lines (`--shuffle_buffer`) then mixes every domain, where
pages written source by source made it a curriculum of one domain after another. The
held-out splits keep the sources' order. The build is deterministic.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import html
import html.parser
import json
import os
import re
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence

DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manuals")
SPLITS = ("train", "valid", "test")
HELD_OUT_PERCENT = 1
# Shorter lines are headings, captions and list fragments rather than sentences.
MIN_WORDS = 4
# A sentence that is mostly symbols is code or a command line that escaped the markup.
MIN_LETTER_SHARE = 0.6


@dataclasses.dataclass(frozen=True)
class Source:
    """One package's manual: where its pages are and how they are read."""

    name: str
    package: str
    licence: str
    root: str
    patterns: tuple[str, ...]
    kind: str  # "html" or "pod"
    exclude: str = r"$^"  # a regular expression over the page's path under root


SOURCES = (
    Source("linux", "linux-doc-6.1", "GPL-2.0 (the Linux kernel's Documentation/)",
           "/usr/share/doc/linux-doc-6.1/html", ("**/*.html",), "html",
           exclude=r"^(_|genindex|search)"),
    Source("python", "python3.11-doc", "PSF License Version 2 (Python documentation)",
           "/usr/share/doc/python3.11/html", ("**/*.html",), "html",
           exclude=r"^(_|genindex|search|py-modindex|whatsnew/changelog)"),
    Source("postgresql", "postgresql-doc-15", "PostgreSQL Licence (BSD-like)",
           "/usr/share/doc/postgresql-doc-15/html", ("*.html",), "html",
           exclude=r"^(bookindex|release-)"),
    Source("perl", "perl-doc", "Perl: Artistic License 1.0 or GPL-1.0+",
           "/usr/share/perl/5.36/pod", ("*.pod",), "pod",
           exclude=r"^perl5\d+delta"),
    Source("debian-reference", "debian-reference-en", "GPL-2.0+ (Debian Reference)",
           "/usr/share/debian-reference", ("*.en.html",), "html"),
    Source("gnu-standards", "gnu-standards",
           "GFDL 1.3+, no invariant sections (GNU Coding Standards)",
           "/usr/share/doc/gnu-standards", ("*.html",), "html"),
    Source("django", "python-django-doc", "BSD-3-Clause (Django documentation)",
           "/usr/share/doc/python-django-doc/html", ("**/*.html",), "html",
           exclude=r"^(_|genindex|search|py-modindex|releases/)"),
    Source("debian-handbook", "debian-handbook", "GPL-2.0+ or CC-BY-SA-3.0",
           "/usr/share/doc/debian-handbook/html/en-US", ("*.html",), "html",
           exclude=r"^(ix01|index)"),
    Source("git", "git-doc", "GPL-2.0 (Git documentation)",
           "/usr/share/doc/git-doc", ("**/*.html",), "html", exclude=r"^RelNotes"),
    Source("octave", "octave-doc", "GPL-3.0+ (GNU Octave manual)",
           "/usr/share/doc/octave", ("**/*.html",), "html", exclude=r"index"),
    Source("cmake", "cmake-doc", "BSD-3-Clause (CMake documentation)",
           "/usr/share/doc/cmake-data/html", ("**/*.html",), "html",
           exclude=r"^(_|genindex|search|release/)"),
    Source("erlang", "erlang-doc", "Apache-2.0 (Erlang/OTP documentation)",
           "/usr/share/doc/erlang-doc", ("**/*.html",), "html",
           exclude=r"(^|/)(java|release_notes|notes\.html|.*index)"),
    Source("scipy", "python-scipy-doc", "BSD-3-Clause (SciPy documentation)",
           "/usr/share/doc/python-scipy-doc/html", ("**/*.html",), "html",
           exclude=r"^(_|genindex|search|py-modindex|release)"),
)

# HTML elements whose text is prose; nested ones (a <p> inside an <li>) close the outer.
# Publican's HTML (the Debian Handbook) writes its paragraphs as <div class="para">.
_PROSE_ELEMENTS = frozenset({"p", "li", "dd", "blockquote"})
_PROSE_CLASS = re.compile(r"\bpara\b")
# Elements whose content is never prose, and page furniture by class name.
_SKIPPED_ELEMENTS = frozenset({"pre", "script", "style", "table", "head", "nav"})
_SKIPPED_CLASSES = re.compile(
    r"\b(sphinxsidebar|related|footer|navheader|navfooter|toc|headerlink|highlight)\b")
_VOID_ELEMENTS = frozenset({"br", "img", "hr", "meta", "link", "input", "wbr", "col",
                            "area", "base", "source"})


class _ProseParser(html.parser.HTMLParser):
    """Collects the text of prose elements outside skipped ones (see `html_paragraphs`)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._open: list[tuple[str, bool, bool]] = []  # (tag, skips content, is prose)
        self._skipping = 0
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in _VOID_ELEMENTS:
            if tag == "br" and self._text is not None:
                self._text.append(" ")
            return
        classes = dict(attrs).get("class") or ""
        skips = tag in _SKIPPED_ELEMENTS or bool(_SKIPPED_CLASSES.search(classes))
        prose = tag in _PROSE_ELEMENTS or bool(_PROSE_CLASS.search(classes))
        self._open.append((tag, skips, prose))
        self._skipping += skips
        if prose and not self._skipping:
            self._flush()
            self._text = []

    def handle_endtag(self, tag):
        if tag not in (open_tag for open_tag, _, _ in self._open):
            return  # a stray end tag
        while self._open:
            open_tag, skips, prose = self._open.pop()
            self._skipping -= skips
            if prose:
                self._flush()
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._text is not None and not self._skipping:
            self._text.append(data)

    def _flush(self):
        if self._text:
            self.paragraphs.append(" ".join("".join(self._text).split()))
        self._text = None

    def close(self):
        super().close()
        self._flush()


def html_paragraphs(page: str) -> list[str]:
    """The prose paragraphs of an HTML page, each on one line with single spaces."""
    parser = _ProseParser()
    parser.feed(page)
    parser.close()
    return [paragraph for paragraph in parser.paragraphs if paragraph]


_POD_CODE = re.compile(r"[A-Z]<(<+ )?")


def _strip_pod_codes(text: str) -> str:
    """Removes POD formatting codes (B<bold>, C<< code >>, L<text|link>, E<gt>), keeping
    the words they wrap; a link shows its text, or its target without the section sign."""
    text = re.sub(r"E<(\w+)>", lambda m: html.unescape(f"&{m.group(1)};")
                  if not m.group(1).isdigit() else chr(int(m.group(1))), text)
    text = re.sub(r"[SXZ]<([^<>]*)>", lambda m: "" if m.group(0)[0] in "XZ" else m.group(1),
                  text)
    # Innermost codes first, so nested ones (B<C<x>>) unwrap from the inside out.
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"L<([^<>|]*\|)?([^<>]*)>",
                      lambda m: m.group(1)[:-1] if m.group(1) else m.group(2).replace('"', "")
                      .replace("/", " "), text)
        text = re.sub(r"[A-Z]<<+ (.*?) >>+", r"\1", text)
        text = re.sub(r"[A-Z]<([^<>]*)>", r"\1", text)
    return text


def pod_paragraphs(pod: str) -> list[str]:
    """The ordinary paragraphs of a POD document (not commands, verbatim blocks, or the
    text of `=begin`/`=for` blocks meant for other formatters), formatting codes removed."""
    paragraphs, in_block = [], False
    for block in re.split(r"\n[ \t]*\n", pod):
        if not block.strip():
            continue
        if block.startswith("="):
            command = block.split(None, 1)[0]
            in_block = (command == "=begin") or (in_block and command != "=end")
            if command in ("=item", "=head1", "=head2", "=head3", "=head4"):
                continue  # headings and item labels are not sentences
            continue
        if in_block or block[0] in " \t":
            continue
        paragraphs.append(" ".join(_strip_pod_codes(block).split()))
    return [paragraph for paragraph in paragraphs if paragraph]


# A sentence ends at . ! or ? (maybe closed by a quote or bracket) before a space and a
# capital, digit or opening quote; not after the abbreviations below.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s+[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|Mr|Dr|No|Fig|approx|resp|al)\.$",
                            re.IGNORECASE)


def sentences(paragraph: str) -> list[str]:
    """Cuts a paragraph into sentences (not after common abbreviations)."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        if _ABBREVIATIONS.search(paragraph[start:match.start() + 1]):
            continue
        pieces.append(paragraph[start:match.end()].strip())
        start = match.end()
    pieces.append(paragraph[start:].strip())
    return [piece for piece in pieces if piece]


def is_prose(sentence: str) -> bool:
    """Whether a sentence reads as text: enough words, mostly letters and spaces."""
    if len(sentence.split()) < MIN_WORDS:
        return False
    letters = sum(character.isalpha() or character == " " for character in sentence)
    return letters >= MIN_LETTER_SHARE * len(sentence)


def normalise(text: str) -> str:
    """NFC with typographic spaces made plain (the tokenizer sees one kind of space)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def split_of(source: str, path: str) -> str:
    """The split of a page: a stable CRC-32 of its source and path (not of its lines)."""
    bucket = zlib.crc32(f"{source}/{path}".encode("utf-8")) % 100
    if bucket < HELD_OUT_PERCENT:
        return "valid"
    return "test" if bucket < 2 * HELD_OUT_PERCENT else "train"


def training_page_rank(source: str, path: str) -> int:
    """Where a training page goes in train.txt.gz: a stable CRC-32 of its source and path,
    salted to be independent of `split_of`'s."""
    return zlib.crc32(f"order/{source}/{path}".encode("utf-8"))


def page_sentences(text: str, kind: str) -> Iterator[str]:
    """The prose sentences of one page's source text."""
    paragraphs = html_paragraphs(text) if kind == "html" else pod_paragraphs(text)
    for paragraph in paragraphs:
        for sentence in sentences(normalise(paragraph)):
            if is_prose(sentence):
                yield sentence


def source_pages(source: Source) -> list[str]:
    """The paths (relative to the source's root, sorted) of its pages."""
    if not os.path.isdir(source.root):
        raise FileNotFoundError(
            f"{source.root} is missing: apt-get install {source.package}")
    exclude = re.compile(source.exclude)
    paths = {os.path.relpath(path, source.root) for pattern in source.patterns
             for path in glob.glob(os.path.join(source.root, pattern), recursive=True)}
    return sorted(path for path in paths if not exclude.search(path)
                  and os.path.isfile(os.path.join(source.root, path)))


def _read(path: str) -> str:
    with open(path, "rb") as file:
        return file.read().decode("utf-8", errors="replace")


def build_lines(sources: Iterable[Source]) -> tuple[dict[str, list[str]], list[dict]]:
    """Every source's sentences by split, each line once (its first page in the sources'
    order keeps it), the training pages interleaved by `training_page_rank`; and
    per-source statistics."""
    seen: set[str] = set()
    pages: dict[str, list[tuple[str, str, list[str]]]] = {split: [] for split in SPLITS}
    statistics = []
    for source in sources:
        counts = {split: {"pages": 0, "lines": 0, "words": 0} for split in SPLITS}
        for path in source_pages(source):
            split = split_of(source.name, path)
            counts[split]["pages"] += 1
            kept = []
            for sentence in page_sentences(_read(os.path.join(source.root, path)),
                                           source.kind):
                if sentence in seen:
                    continue
                seen.add(sentence)
                kept.append(sentence)
                counts[split]["lines"] += 1
                counts[split]["words"] += len(sentence.split())
            pages[split].append((source.name, path, kept))
        statistics.append({"name": source.name, "package": source.package,
                           "licence": source.licence, "splits": counts})
    pages["train"].sort(key=lambda page: training_page_rank(page[0], page[1]))
    lines = {split: [line for *_, kept in pages[split] for line in kept] for split in SPLITS}
    return lines, statistics


def _write_gzip_lines(path: str, lines: Sequence[str]) -> None:
    """Writes lines to a gzip file whose bytes depend only on the lines (mtime=0)."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0) as file:
        file.write("".join(line + "\n" for line in lines).encode("utf-8"))
    os.replace(temporary, path)


def corpus_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.txt.gz")


def build_corpus(output_dir: str, sources: Sequence[Source] | None = None) -> list[dict]:
    """Writes `{train,valid,test}.txt.gz` and `sources.json` (per source: package,
    licence, pages, lines and words of each split) to `output_dir`; `sources`: SOURCES."""
    lines, statistics = build_lines(SOURCES if sources is None else sources)
    os.makedirs(output_dir, exist_ok=True)
    for split in SPLITS:
        _write_gzip_lines(corpus_path(output_dir, split), lines[split])
    with open(os.path.join(output_dir, "sources.json"), "w") as file:
        json.dump(statistics, file, indent=1)
        file.write("\n")
    return statistics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--packages", action="store_true",
                        help="Print the Debian packages the sources come from, and exit.")
    args = parser.parse_args(argv)
    if args.packages:
        print(" ".join(source.package for source in SOURCES))
        return
    try:
        statistics = build_corpus(args.output_dir)
    except FileNotFoundError as error:
        sys.exit(f"Error: {error}")
    for source in statistics:
        words = {split: counts["words"] for split, counts in source["splits"].items()}
        print(f"{source['name']:>16}: " + ", ".join(f"{split} {count:,} words"
                                                    for split, count in words.items()))
    print(f"Wrote {args.output_dir}")


if __name__ == "__main__":
    main()
