"""Builds the built-in English-Spanish parallel corpus from two public-domain Bibles.

The corpus pairs the World English Bible (SWORD module engWEB2015eb) with the
Reina-Valera 1909 (module spaRV1909eb), one verse per line, and splits it into
train/valid/test by a stable hash of the verse reference. Both modules come from
Debian (`apt-get install sword-text-web sword-text-sparv`) and are read with
pysword (`pip install pysword`), which is needed only to rebuild the corpus,
never to use it:

    python -m train.data.bible_corpus --output_dir train/data/bible

The cleaning functions take and return plain strings so that they can be tested
without pysword or the SWORD modules.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import os
import re
import sys
import unicodedata
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence

EN_MODULE = "engWEB2015eb"
ES_MODULE = "spaRV1909eb"
DEFAULT_SWORD_PATH = "/usr/share/sword"
SPLITS = ("train", "valid", "test")
LANGUAGES = ("en", "es")

# A verse reference: (OSIS book abbreviation, chapter, verse), e.g. ("Gen", 1, 1).
Ref = tuple[str, int, int]

# A pair whose longer side has more than this many times the words of the shorter
# side is almost always a verse shifted by the two versifications (NRSVA vs KJV).
MAX_WORD_RATIO = 2.0

# WEB appends its whole glossary to the last verse of Revelation.
GLOSSARY_MARKER = "The following words used in the World English Bible"
AMEN = "Amén."

_TAG = re.compile(r"<(/?)([A-Za-z]+)\b([^>]*)>")
# Elements whose content is not Bible text: footnotes and cross-references, the
# speaker labels of the Song of Songs, and editorial headings. Canonical titles
# (the psalm superscriptions, which RV1909 prints inside verse 1) are kept so
# that the two languages say the same thing.
_DROPPED_ELEMENTS = frozenset({"note", "speaker", "title"})
# Elements that wrap words or phrases inside running text; every other tag
# (lines, paragraphs, line groups, milestones) marks a break between words.
_INLINE_ELEMENTS = frozenset(
    {"w", "q", "seg", "name", "hi", "divineName", "foreign", "transChange"}
)
# RV1909 marks words supplied by the translators with <transChange>; it often
# writes the tag with no space next to the neighbouring word ("allí<tc>también"),
# but when the supplied word is an enclitic pronoun the two really are one word
# ("sáca<tc>lo" = "sácalo").
_CLITICS = frozenset({"lo", "la", "los", "las", "le", "les", "me", "te", "se", "nos", "os"})
# Words after which RV1909 puts a pronoun in a <transChange> with no space although
# the pronoun stands on its own ("Josué los circuncidó", "no lo", "os lo hubiera").
# Found by listing every pronoun written against the preceding word in the module.
_NOT_CLITIC_HOSTS = frozenset(
    {"no", "como", "que", "os", "y", "ellos", "cuánto", "gentes", "josué", "jehová", "dios"}
)

# Stands for a word break that cleaning inserted (as opposed to a space that was in
# the source), so that it can be dropped again where it would sit before closing
# punctuation ("God<note/>." must become "God." and not "God .").
_BREAK = "\x00"
_CLOSING_PUNCTUATION = ",.;:!?)]}”’»…"
_OPENING_PUNCTUATION = "([{“‘«¡¿"
_LETTERS = re.compile(r"[^\W\d_]+")
# After these a word starts a sentence (Spanish also opens one with ¡ and ¿).
_BEFORE_SENTENCE = ".!?:¡¿"


def cut_glossary(osis: str) -> str:
    """Returns `osis` without the WEB glossary that follows the last verse, if any.

    The glossary starts with a `<div type="glossary">` in the OSIS source and with
    the sentence `GLOSSARY_MARKER` in its text; the text is cut at whichever comes
    first, so this works on markup and on already-cleaned text alike.
    """
    cuts = [m.start() for m in re.finditer(r"<div\b[^>]*\btype=\"glossary\"", osis)]
    marker = osis.find(GLOSSARY_MARKER)
    if marker >= 0:
        cuts.append(marker)
    return osis[: min(cuts)] if cuts else osis


def _attribute(attributes: str, name: str) -> str | None:
    """Returns the value of attribute `name` in a tag's attribute string, if present."""
    match = re.search(r"\b" + name + r"=\"([^\"]*)\"", attributes)
    return match.group(1) if match else None


def _is_enclitic(previous: str, clitic: str) -> bool:
    """Whether pronoun `clitic`, written right after text `previous`, belongs to its last word."""
    host = re.search(r"[^\W\d_]+$", previous)
    return bool(host) and clitic in _CLITICS and host.group(0).lower() not in _NOT_CLITIC_HOSTS


def _join_breaks(text: str) -> str:
    """Turns runs of whitespace and inserted breaks into single spaces or nothing.

    A run that holds source whitespace becomes one space. A run made only of
    inserted breaks becomes one space too, except before closing punctuation,
    after opening punctuation and at either end of the text, where the source had
    no space either.
    """

    def replace(match: re.Match[str]) -> str:
        run = match.group(0)
        if run.strip(_BREAK):  # contains real whitespace from the source
            return " "
        before = text[match.start() - 1] if match.start() > 0 else ""
        after = text[match.end()] if match.end() < len(text) else ""
        if not before or not after:
            return ""
        if after in _CLOSING_PUNCTUATION or before in _OPENING_PUNCTUATION:
            return ""
        return " "

    text = re.sub(r"[\s" + _BREAK + r"]+", replace, text).strip()
    # Markup around a footnote sometimes leaves a source space before punctuation
    # ("two assaria coins</q> <note/> <q>? Not"); a word never takes one.
    return re.sub(r"(?<=[^\W\d_]) (?=[,.;:!?])", "", text)


def osis_to_text(osis: str) -> str:
    """Converts one verse of OSIS markup to plain text on a single line.

    Removes footnotes, cross-references, Strong's-number word tags, non-canonical
    titles, speaker labels and all other markup; keeps case, accents and
    punctuation. Where dropped markup separated two words a space is left, so that
    words are never glued ("God<note>…</note>created" -> "God created"). The result
    is NFC-normalised with single spaces.
    """
    pieces = re.split(r"(<[^>]*>)", osis)
    out: list[str] = []
    # One entry per open note/speaker/title: whether its content is being dropped.
    open_dropped: list[bool] = []
    for index, piece in enumerate(pieces):
        tag = _TAG.fullmatch(piece)
        if not tag:
            if not any(open_dropped):
                out.append(piece)
            continue
        closing, name, attributes = tag.group(1), tag.group(2), tag.group(3)
        if name in _DROPPED_ELEMENTS:
            if closing and open_dropped:
                open_dropped.pop()
            elif not closing and not attributes.rstrip().endswith("/"):
                canonical = name == "title" and _attribute(attributes, "canonical") == "true"
                open_dropped.append(not canonical)
            out.append(_BREAK)
        elif any(open_dropped):
            continue
        elif name not in _INLINE_ELEMENTS:
            out.append(_BREAK)
        elif name == "transChange":
            # The supplied words are a separate word unless they are an enclitic
            # pronoun written against its verb.
            content = pieces[index + 1] if index + 1 < len(pieces) else ""
            joined = not closing and _is_enclitic("".join(out), content)
            out.append("" if joined else _BREAK)
    text = unicodedata.normalize("NFC", "".join(out))
    return _join_breaks(text)


def _fold(word: str) -> str:
    """Lower-cases `word` and strips its accents ("Achâb" -> "achab")."""
    decomposed = unicodedata.normalize("NFD", word.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def find_proper_nouns(texts: Iterable[str]) -> frozenset[str]:
    """Returns the words (folded by `_fold`) usually capitalised inside sentences.

    Only words that are neither sentence-initial nor all upper case are counted,
    so "Jehová" and "Achâb" count as capitalised and "aconteció" does not. Used to
    restore the case of words that the printed edition set in capitals; accents
    are ignored because the capitals sometimes drop them ("ACHAB").
    """
    counts: collections.Counter[tuple[str, bool]] = collections.Counter()
    for text in texts:
        previous_end = None
        for match in _LETTERS.finditer(text):
            word = match.group(0)
            sentence_initial = previous_end is None or any(
                c in _BEFORE_SENTENCE for c in text[previous_end : match.start()]
            )
            if not sentence_initial and not (len(word) > 1 and word.isupper()):
                counts[(_fold(word), word[0].isupper())] += 1
            previous_end = match.end()
    return frozenset(
        word for (word, upper), n in counts.items() if upper and n > counts[(word, False)]
    )


def decapitalise_chapter_start(text: str, proper_nouns: frozenset[str] = frozenset()) -> str:
    """Undoes the capitals that RV1909 prints over each chapter's first word(s).

    "EN el principio" -> "En el principio", "Y ACONTECIÓ que" -> "Y aconteció que",
    "Salmo de David. ¡OH Jehová" -> "Salmo de David. ¡Oh Jehová" (RV1909 keeps
    psalm titles in verse 1, so the capitals need not open the verse). The first
    word of the capitalised run keeps its initial capital; later words are lower
    case unless `proper_nouns` (see `find_proper_nouns`) lists them: "Y JEHOVÁ" ->
    "Y Jehová". A capitalised label before the capitalised opening is left alone
    (the acrostic letter in "ALEPH. BIENAVENTURADOS los" -> "ALEPH. Bienaventurados los").
    """
    words = list(_LETTERS.finditer(text))

    def all_caps(i: int) -> bool:
        return i < len(words) and len(words[i].group(0)) > 1 and words[i].group(0).isupper()

    def adjacent(i: int, j: int) -> bool:  # only whitespace between words i and j
        return not text[words[i].end() : words[j].start()].strip()

    def label(i: int) -> bool:  # "ALEPH." followed by another capitalised word
        return text[words[i].end() : words[i].end() + 1] == "." and all_caps(i + 1)

    start = next((i for i in range(len(words)) if all_caps(i) and not label(i)), None)
    if start is None:
        return text
    end = start + 1
    while all_caps(end) and adjacent(end - 1, end):
        end += 1
    # A single capital letter just before the run ("Y ACONTECIÓ", "A TI") opens it.
    previous = words[start - 1].group(0) if start > 0 else ""
    if len(previous) == 1 and previous.isupper() and adjacent(start - 1, start):
        start -= 1
    pieces, last = [], 0
    for i in range(start, end):
        word = words[i].group(0)
        if i == start or _fold(word) in proper_nouns:
            new = word[0] + word[1:].lower()
        else:
            new = word.lower()
        pieces += [text[last : words[i].start()], new]
        last = words[i].end()
    return "".join(pieces) + text[last:]


def cut_subscription(text: str) -> str:
    """Removes the note on where an epistle was written that RV1909 appends to its last verse.

    "... sea con todos vosotros. Amén. Fué escrita á los Hebreos desde Italia con
    Timoteo." -> "... sea con todos vosotros. Amén." These subscriptions follow the
    final "Amén." and say where the letter was written ("escrita") or how it was
    sent ("enviada"); they are not part of the WEB text.
    """
    end = text.rfind(AMEN)
    if end < 0:
        return text
    end += len(AMEN)
    return text[:end] if re.search(r"\b(escrita|enviada)\b", text[end:], re.IGNORECASE) else text


def word_count(text: str) -> int:
    """Number of whitespace-separated words in `text`."""
    return len(text.split())


def keep_pair(en: str, es: str, max_ratio: float = MAX_WORD_RATIO) -> bool:
    """Whether two verses are plausibly translations of each other (by length)."""
    short, long = sorted((word_count(en), word_count(es)))
    return short > 0 and long <= max_ratio * short


def split_of(ref: str) -> str:
    """Returns the split ("train", "valid" or "test") of a verse reference.

    A CRC-32 of the reference puts about 90% / 5% / 5% of the verses in the
    three splits, the same on every machine and every rebuild.
    """
    bucket = zlib.crc32(ref.encode("utf-8")) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def read_module(name: str, sword_path: str = DEFAULT_SWORD_PATH) -> dict[Ref, str]:
    """Reads every verse of SWORD module `name` as raw OSIS, keyed by (book, chapter, verse).

    Books are keyed by their OSIS abbreviation ("Gen", "1Kgs"); the dict is in
    canonical order. Book and chapter headings (verse 0) are not read and empty
    verses are skipped.
    """
    try:
        from pysword.modules import SwordModules
    except ImportError as error:
        raise SystemExit(
            "Rebuilding the Bible corpus needs pysword: `pip install pysword` "
            f"(and the texts: `apt-get install sword-text-web sword-text-sparv`). ({error})"
        ) from error
    if not os.path.isdir(os.path.join(sword_path, "mods.d")):
        raise SystemExit(
            f"No SWORD modules under {sword_path}: "
            "`apt-get install sword-text-web sword-text-sparv`."
        )
    modules = SwordModules(sword_path)
    if name not in modules.parse_modules():
        raise SystemExit(
            f"SWORD module {name} is not installed under {sword_path}: "
            "`apt-get install sword-text-web sword-text-sparv`."
        )
    bible = modules.get_bible_from_module(name)
    # pysword inflates a whole book's compressed block again for every verse
    # (~50 s a module); caching the per-block decompression makes it ~1 s.
    bible._decompressed_text = functools.lru_cache(maxsize=None)(bible._decompressed_text)
    verses: dict[Ref, str] = {}
    for books in bible.get_structure().get_books().values():
        for book in books:
            for chapter, length in enumerate(book.chapter_lengths, start=1):
                texts = bible.get_iter(books=book.name, chapters=chapter, clean=False)
                for verse, osis in zip(range(1, length + 1), texts):
                    if osis.strip():
                        verses[(book.osis_name, chapter, verse)] = osis
    return verses


def clean_verses(verses: Mapping[Ref, str]) -> dict[Ref, str]:
    """Cleans raw OSIS verses to text (`osis_to_text`), dropping verses left empty."""
    texts = {ref: osis_to_text(cut_glossary(osis)) for ref, osis in verses.items()}
    return {ref: text for ref, text in texts.items() if text}


def fix_rv1909(texts: Mapping[Ref, str]) -> dict[Ref, str]:
    """Applies the RV1909-specific fixes to cleaned verses (in canonical order).

    Verse 1 of each chapter goes through `decapitalise_chapter_start`, with
    proper nouns found in the module's own text, and the last verse of each book
    through `cut_subscription`.
    """
    proper_nouns = find_proper_nouns(texts.values())
    last_verses = {ref[0]: ref for ref in texts}  # later verses overwrite earlier ones
    fixed = {}
    for ref, text in texts.items():
        if ref[2] == 1:
            text = decapitalise_chapter_start(text, proper_nouns)
        if last_verses[ref[0]] == ref:
            text = cut_subscription(text)
        fixed[ref] = text
    return fixed


def format_ref(ref: Ref) -> str:
    """("Gen", 1, 1) -> "Gen 1:1"."""
    return f"{ref[0]} {ref[1]}:{ref[2]}"


def _word_set(text: str) -> set[str]:
    """The distinct lower-cased words of `text`."""
    return set(_LETTERS.findall(text.lower()))


def find_shifted_chapters(
    en: Mapping[Ref, str],
    es: Mapping[Ref, str],
    max_offset: int = 6,
    min_run: int = 3,
) -> list[tuple[str, int]]:
    """Finds the chapters that the two texts number differently, as (book, chapter).

    The modules follow different versifications (NRSVA vs KJV, and RV1909 follows
    the Hebrew numbering in places), so in some chapters verse v of one text is
    verse v+k of the other for a run of verses. Such pairs often have similar
    lengths, which `keep_pair` cannot see. Since most verses are aligned, words
    that keep occurring in the same pairs (Dice coefficient >= 0.3) form a rough
    dictionary; a pair is shifted by k when the English verse has clearly more
    dictionary translations in Spanish verse v+k than in verse v. A chapter where
    `min_run` consecutive verses are shifted by the same k is reported; the list
    is in canonical order.
    """
    common = [ref for ref in es if ref in en]
    en_words = {ref: _word_set(en[ref]) for ref in common}
    es_words = {ref: _word_set(text) for ref, text in es.items()}
    en_df = collections.Counter(w for ref in common for w in en_words[ref])
    es_df = collections.Counter(w for ref in common for w in es_words[ref])
    # Rare words give chance associations; the commonest occur in most verses.
    en_vocab = {w for w, n in en_df.items() if 3 <= n <= 1500}
    es_vocab = {w for w, n in es_df.items() if 3 <= n <= 1500}
    cooccurrences: collections.Counter[tuple[str, str]] = collections.Counter()
    for ref in common:
        es_in_vocab = es_words[ref] & es_vocab
        for en_word in en_words[ref] & en_vocab:
            for es_word in es_in_vocab:
                cooccurrences[(en_word, es_word)] += 1
    translations: dict[str, set[str]] = collections.defaultdict(set)
    for (en_word, es_word), n in cooccurrences.items():
        if 2 * n >= 0.3 * (en_df[en_word] + es_df[es_word]):
            translations[en_word].add(es_word)

    def overlap(words: list[str], es_ref: Ref) -> float:
        return sum(1 for w in words if translations[w] & es_words[es_ref]) / len(words)

    offsets: dict[Ref, int] = {}
    for ref in common:
        words = sorted(w for w in en_words[ref] if w in translations)
        if len(words) < 3:  # too little evidence either way
            continue
        aligned = overlap(words, ref)
        candidates = [
            (overlap(words, (ref[0], ref[1], ref[2] + k)), k)
            for k in range(-max_offset, max_offset + 1)
            if k and (ref[0], ref[1], ref[2] + k) in es_words
        ]
        if candidates and max(candidates)[0] >= aligned + 0.25:
            offsets[ref] = max(candidates)[1]
    runs = (
        ref[:2]
        for ref, k in offsets.items()
        if all(offsets.get((ref[0], ref[1], ref[2] + i)) == k for i in range(min_run))
    )
    return list(dict.fromkeys(runs))


def align(
    en: Mapping[Ref, str], es: Mapping[Ref, str], shifted: Collection[tuple[str, int]] = ()
) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """Pairs verses present in both texts, in the Spanish (KJV) canonical order.

    Drops the pairs of the `shifted` chapters (see `find_shifted_chapters`) and
    pairs failing `keep_pair`. Returns (reference, English, Spanish) triples and
    the number of pairs dropped for each reason.
    """
    shifted = set(shifted)
    pairs, dropped = [], {"shifted chapter": 0, "length ratio": 0}
    for ref, es_text in es.items():
        if ref not in en:
            continue
        if ref[:2] in shifted:
            dropped["shifted chapter"] += 1
        elif not keep_pair(en[ref], es_text):
            dropped["length ratio"] += 1
        else:
            pairs.append((format_ref(ref), en[ref], es_text))
    return pairs, dropped


def _write_gzip_lines(path: str, lines: Sequence[str]) -> None:
    """Writes lines to a gzip file whose bytes depend only on the lines (mtime=0)."""
    with open(path, "wb") as raw, gzip.GzipFile(
        filename=os.path.basename(path)[: -len(".gz")], mode="wb", fileobj=raw, mtime=0
    ) as stream:
        stream.write("".join(line + "\n" for line in lines).encode("utf-8"))


def _readme(
    counts: Mapping[str, Mapping[str, tuple[int, int]]],
    dropped: Mapping[str, int],
    shifted: Collection[tuple[str, int]],
) -> str:
    """The README.md of the output directory; counts[split][lang] = (lines, words)."""
    chapters = ", ".join(f"{book} {chapter}" for book, chapter in shifted)
    rows = "\n".join(
        f"| {split} | {counts[split]['en'][0]:,} "
        f"| {counts[split]['en'][1]:,} | {counts[split]['es'][1]:,} |"
        for split in SPLITS
    )
    return f"""# Built-in English-Spanish parallel corpus (Bible verses)

A small verse-aligned parallel corpus, shipped so that the translation model can
be trained and tested with no download.

- English: World English Bible (SWORD module `{EN_MODULE}`, Debian package
  `sword-text-web`). Public domain.
- Spanish: Reina-Valera 1909 (SWORD module `{ES_MODULE}`, Debian package
  `sword-text-sparv`). Public domain.

## Files

`en.SPLIT.txt.gz`, `es.SPLIT.txt.gz` and `refs.SPLIT.txt.gz` for SPLIT in
train, valid, test: UTF-8 text, one verse per line; line i of the three files is
the same verse (`refs` holds its reference, e.g. `Gen 1:1`, with OSIS book names).

| split | lines | English words | Spanish words |
| --- | ---: | ---: | ---: |
{rows}

Text is plain (no markup, Strong's numbers or footnotes), NFC, with case, accents
and punctuation kept. Psalm titles are part of verse 1 in both languages. Verses
are assigned to a split by a CRC-32 of the reference (about 90% / 5% / 5%). The
Bible repeats itself, so some valid/test verses have near-duplicates in train.

The pairs are the references present in both texts (the WEB's deuterocanonical
books are not in RV1909), less those that the two versifications number differently:

- {dropped["shifted chapter"]} pairs in chapters where verse v of one text is verse v+k of
  the other: {chapters};
- {dropped["length ratio"]} other pairs whose word counts differ by more than {MAX_WORD_RATIO:g}x.

## Rebuilding

```
apt-get install sword-text-web sword-text-sparv
pip install pysword
python -m train.data.bible_corpus --output_dir train/data/bible
```

The build is deterministic: rebuilding from the same modules gives identical files.
"""


def build_corpus(output_dir: str, sword_path: str = DEFAULT_SWORD_PATH) -> None:
    """Reads, cleans, aligns, splits and writes the corpus and its README to `output_dir`."""
    en = clean_verses(read_module(EN_MODULE, sword_path))
    es = fix_rv1909(clean_verses(read_module(ES_MODULE, sword_path)))
    shifted = find_shifted_chapters(en, es)
    pairs, dropped = align(en, es, shifted)
    os.makedirs(output_dir, exist_ok=True)
    counts: dict[str, dict[str, tuple[int, int]]] = {}
    for split in SPLITS:
        chosen = [pair for pair in pairs if split_of(pair[0]) == split]
        columns = {
            "refs": [ref for ref, _, _ in chosen],
            "en": [en_text for _, en_text, _ in chosen],
            "es": [es_text for _, _, es_text in chosen],
        }
        for prefix, lines in columns.items():
            _write_gzip_lines(os.path.join(output_dir, f"{prefix}.{split}.txt.gz"), lines)
        counts[split] = {
            lang: (len(columns[lang]), sum(word_count(line) for line in columns[lang]))
            for lang in LANGUAGES
        }
        print(f"{split}: {len(chosen)} verses", file=sys.stderr)
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as readme:
        readme.write(_readme(counts, dropped, shifted))
    print(f"{len(pairs)} verse pairs in {output_dir}; dropped: {dropped}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", default="train/data/bible", help="Where to write the corpus."
    )
    parser.add_argument(
        "--sword_path", default=DEFAULT_SWORD_PATH, help="SWORD library with mods.d/."
    )
    args = parser.parse_args(argv)
    build_corpus(args.output_dir, args.sword_path)


if __name__ == "__main__":
    main()
