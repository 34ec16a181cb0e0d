"""Tests of the Bible corpus builder's cleaning functions and of the shipped corpus.

None of these needs pysword or the SWORD modules: the cleaning functions take
strings, and the shipped files are read as they are in train/data/bible.
"""

import gzip
import os
import re

import pytest

from train.data import bible_corpus as bc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "train", "data", "bible")


# --- Cleaning functions, on OSIS snippets from the two modules -------------------------


def test_footnote_is_removed_leaving_a_space():
    osis = (
        '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 '
        "</reference>The Hebrew word rendered “God” is “אֱלֹהִ֑ים” "
        "(Elohim).</note>"
        '<w lemma="strong:H1254">created</w> <w lemma="strong:H0853">the</w> heavens.'
    )
    assert bc.osis_to_text(osis) == "God created the heavens."


def test_footnote_before_punctuation_leaves_no_space():
    osis = (
        'the <w lemma="strong:H4428">cornerstone</w>'
        '<note placement="foot">Literally, head</note>.'
    )
    assert bc.osis_to_text(osis) == "the cornerstone."


def test_cross_reference_note_is_removed():
    osis = (
        "<q>“Blessed are the poor in spirit,</q> <note type=\"crossReference\"> "
        '<reference type="annotateRef">5:3 </reference> '
        "<reference>Isaiah 57:15; 66:2</reference> </note>"
    )
    assert bc.osis_to_text(osis) == "“Blessed are the poor in spirit,"


def test_strongs_tags_are_removed():
    osis = (
        '<w lemma="strong:H7225">En el principio</w> '
        '<w lemma="strong:H1254 H0853">crió</w> Dios.'
    )
    text = bc.osis_to_text(osis)
    assert text == "En el principio crió Dios."
    assert not re.search(r"strong|H\d", text)


def test_non_canonical_title_is_removed_leaving_a_space():
    assert bc.osis_to_text('end.<title type="main">A Heading</title>Then') == "end. Then"
    assert bc.osis_to_text('one<title type="x-section">Heading</title>two') == "one two"


def test_canonical_psalm_title_is_kept():
    osis = (
        '<div type="x-milestone" subType="x-preverse" sID="pv4877"/><title canonical="true" '
        'type="psalm">A Psalm by David.</title> <lg sID="gen7860"/> <l level="1" sID="gen7861"/>'
        "Yahweh, how my adversaries have increased!"
    )
    assert bc.osis_to_text(osis) == "A Psalm by David. Yahweh, how my adversaries have increased!"


def test_speaker_label_is_removed():
    osis = "<speaker>Beloved</speaker> <lg sID=\"a\"/> <l level=\"1\" sID=\"b\"/>Let him kiss me"
    assert bc.osis_to_text(osis) == "Let him kiss me"


def test_poetry_lines_are_separated_by_one_space():
    osis = (
        'increased!<l eID="g1" level="1"/><l level="2" sID="g2"/>'
        'Many <w>are</w>  those<lb type="x-p"/>'
    )
    assert bc.osis_to_text(osis) == "increased! Many are those"


def test_translator_additions_are_separate_words():
    osis = (
        '<w lemma="strong:H8033">hay allí</w><transChange type="added">también</transChange>'
        '<w lemma="strong:H0916">bdelio</w>'
    )
    assert bc.osis_to_text(osis) == "hay allí también bdelio"


def test_enclitic_pronoun_joins_its_verb():
    osis = (
        '<w lemma="strong:H3318">sáca</w><transChange type="added">lo</transChange> '
        "<w>de</w> este lugar"
    )
    assert bc.osis_to_text(osis) == "sácalo de este lugar"


def test_pronoun_after_a_noun_stays_a_word():
    osis = (
        'la cual <w lemma="strong:H3091">Josué</w>'
        '<transChange type="added">los</transChange> circuncidó'
    )
    assert bc.osis_to_text(osis) == "la cual Josué los circuncidó"


def test_text_is_nfc():
    assert bc.osis_to_text("cri\u006f\u0301") == "crió"


def test_glossary_is_cut_from_markup_and_text():
    osis = (
        "saints. Amen.  <chapter eID=\"Rev.22\"/> <div sID=\"gen35837\" type=\"glossary\"/> "
        '<title level="1" type="main">World English Bible Glossary</title> '
        f"{bc.GLOSSARY_MARKER} (WEB) are not very common. <list><item>Abba</item></list>"
    )
    assert bc.osis_to_text(bc.cut_glossary(osis)) == "saints. Amen."
    assert bc.cut_glossary(f"Amen. {bc.GLOSSARY_MARKER} (WEB) are rare.") == "Amen. "
    assert bc.cut_glossary("In the beginning.") == "In the beginning."


@pytest.mark.parametrize(
    "text, expected",
    [
        ("EN el principio crió Dios", "En el principio crió Dios"),
        ("Y ACONTECIÓ que", "Y aconteció que"),
        ("A TI, oh Jehová", "A ti, oh Jehová"),
        ("DE SIETE años era Joas", "De siete años era Joas"),
        ("Salmo de David. ¡OH Jehová, cuánto", "Salmo de David. ¡Oh Jehová, cuánto"),
        ("ALEPH. BIENAVENTURADOS los perfectos", "ALEPH. Bienaventurados los perfectos"),
        ("ALELUYA. Alabad á Jehová", "Aleluya. Alabad á Jehová"),
        ("Ya en minúsculas.", "Ya en minúsculas."),
    ],
)
def test_chapter_start_is_decapitalised(text, expected):
    assert bc.decapitalise_chapter_start(text) == expected


def test_decapitalisation_keeps_proper_nouns_capitalised():
    proper_nouns = bc.find_proper_nouns(
        ["Y dijo Jehová á Moisés.", "Entonces habló Achâb al pueblo."]
    )
    assert {"jehova", "moises", "achab"} <= proper_nouns
    assert not {"dijo", "entonces", "y"} & proper_nouns  # sentence-initial words do not count
    assert bc.decapitalise_chapter_start("Y JEHOVÁ dijo", proper_nouns) == "Y Jehová dijo"
    assert bc.decapitalise_chapter_start("Y ACHAB dió", proper_nouns) == "Y Achab dió"


def test_epistle_subscription_is_cut():
    verse = (
        "La gracia sea con todos vosotros. Amén. "
        "Fué escrita á los Hebreos desde Italia con Timoteo."
    )
    assert bc.cut_subscription(verse) == "La gracia sea con todos vosotros. Amén."
    assert bc.cut_subscription("Amén. Amén.") == "Amén. Amén."
    assert bc.cut_subscription("Sin amén.") == "Sin amén."


def test_keep_pair_drops_pairs_with_very_different_lengths():
    assert bc.keep_pair("one two three four", "uno dos tres cuatro cinco seis siete ocho")
    assert not bc.keep_pair("one two three", "uno dos tres cuatro cinco seis siete")
    assert not bc.keep_pair("", "uno")


def test_split_is_stable_and_about_90_5_5():
    assert bc.split_of("Gen 1:1") == bc.split_of("Gen 1:1")
    refs = [f"Book{b} {c}:{v}" for b in range(20) for c in range(1, 21) for v in range(1, 26)]
    counts = {split: sum(bc.split_of(ref) == split for ref in refs) for split in bc.SPLITS}
    assert 0.88 < counts["train"] / len(refs) < 0.92
    assert 0.04 < counts["valid"] / len(refs) < 0.06
    assert 0.04 < counts["test"] / len(refs) < 0.06


def _toy_parallel_text(shifted_chapter):
    """A toy two-language Bible in which each English word w<id> translates as s<id>.

    In `shifted_chapter` the Spanish verse v holds the translation of English verse v+1,
    as in a chapter that the two versifications number differently.
    """

    def verse_text(prefix, chapter, verse):
        # Five pseudo-random word ids a verse, spelt in letters (digits are not words).
        ids = [(chapter * 10 + verse) * k % 97 for k in (1, 3, 7, 11, 13)]
        return " ".join(prefix + "".join(chr(ord("a") + int(d)) for d in f"{i:02d}") for i in ids)

    refs = [("Gen", chapter, verse) for chapter in range(1, 11) for verse in range(1, 11)]
    en = {ref: verse_text("w", *ref[1:]) for ref in refs}
    es = {
        ref: verse_text("s", ref[1], ref[2] + 1 if ref[1] == shifted_chapter else ref[2])
        for ref in refs
    }
    return en, es


def test_shifted_chapter_is_found_and_dropped():
    en, es = _toy_parallel_text(shifted_chapter=5)
    shifted = bc.find_shifted_chapters(en, es)
    assert shifted == [("Gen", 5)]
    pairs, dropped = bc.align(en, es, shifted)
    assert dropped == {"shifted chapter": 10, "length ratio": 0}
    assert len(pairs) == 90
    assert pairs[0] == ("Gen 1:1", en[("Gen", 1, 1)], es[("Gen", 1, 1)])


def test_gzip_output_is_byte_identical(tmp_path):
    path = tmp_path / "es.train.txt.gz"
    bc._write_gzip_lines(str(path), ["uno", "dos"])
    first = path.read_bytes()
    bc._write_gzip_lines(str(path), ["uno", "dos"])
    assert path.read_bytes() == first
    assert first[4:8] == b"\0\0\0\0"  # mtime=0
    assert gzip.decompress(first).decode() == "uno\ndos\n"


# --- The shipped corpus -------------------------------------------------------------------


def read_lines(prefix, split):
    with gzip.open(os.path.join(DATA_DIR, f"{prefix}.{split}.txt.gz"), "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


@pytest.fixture(scope="module")
def corpus():
    """{split: (refs, en, es)} of the shipped files."""
    return {
        split: tuple(read_lines(prefix, split) for prefix in ("refs", "en", "es"))
        for split in bc.SPLITS
    }


@pytest.mark.parametrize("split", bc.SPLITS)
def test_split_files_are_parallel_and_clean(corpus, split):
    refs, en, es = corpus[split]
    assert len(refs) == len(en) == len(es) > 0
    for lines in (refs, en, es):
        assert all(line.strip() == line and line for line in lines)
        assert not any("<" in line or ">" in line or "  " in line for line in lines)
    for lines in (en, es):  # no Strong's numbers, footnote references or verse numbers
        assert not any(re.search(r"\d", line) for line in lines)
    assert all(re.fullmatch(r"[1-3]?[A-Z][A-Za-z]+ \d+:\d+", ref) for ref in refs)
    assert all(bc.split_of(ref) == split for ref in refs)


def test_splits_are_disjoint_and_about_90_5_5(corpus):
    refs = {split: corpus[split][0] for split in bc.SPLITS}
    all_refs = [ref for split in bc.SPLITS for ref in refs[split]]
    assert len(all_refs) == len(set(all_refs)) > 30000
    shares = {split: len(refs[split]) / len(all_refs) for split in bc.SPLITS}
    assert 0.88 < shares["train"] < 0.92
    assert 0.04 < shares["valid"] < 0.06
    assert 0.04 < shares["test"] < 0.06


def verse(corpus, ref):
    for refs, en, es in corpus.values():
        if ref in refs:
            return en[refs.index(ref)], es[refs.index(ref)]
    raise KeyError(ref)


def test_known_verses(corpus):
    assert verse(corpus, "Gen 1:1") == (
        "In the beginning, God created the heavens and the earth.",
        "En el principio crió Dios los cielos y la tierra.",
    )
    en, es = verse(corpus, "Ps 3:1")  # the psalm title is in verse 1 on both sides
    assert en.startswith("A Psalm by David, when he fled from Absalom his son. Yahweh,")
    assert es.startswith(
        "Salmo de David, cuando huía de delante de Absalom su hijo. ¡Oh Jehová,"
    )
    assert verse(corpus, "Rev 22:21") == (
        "The grace of the Lord Jesus Christ be with all the saints. Amen.",
        "La gracia de nuestro Señor Jesucristo sea con todos vosotros. Amén.",
    )


def test_no_glossary_or_chapter_capitals_left(corpus):
    en_text = "\n".join(line for _, en, _ in corpus.values() for line in en)
    assert "World English Bible" not in en_text and "Abaddon is Hebrew" not in en_text
    for refs, _, es in corpus.values():
        for ref, line in zip(refs, es):
            if ref.endswith(":1") and ref != "Ps 119:1":  # Ps 119:1 opens with the letter ALEPH
                first = re.search(r"[^\W\d_]{2,}", line).group(0)
                assert not first.isupper(), (ref, line)


def test_files_are_small_and_deterministic():
    paths = [os.path.join(DATA_DIR, name) for name in os.listdir(DATA_DIR)]
    assert sum(os.path.getsize(path) for path in paths) < 5 * 2**20
    for path in paths:
        if path.endswith(".gz"):
            with open(path, "rb") as f:
                assert f.read(8)[4:] == b"\0\0\0\0", f"{path} has a gzip mtime"


def test_readme_states_sources_licence_counts_and_command(corpus):
    with open(os.path.join(DATA_DIR, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert bc.EN_MODULE in readme and bc.ES_MODULE in readme
    assert "Public domain" in readme
    assert "python -m train.data.bible_corpus --output_dir train/data/bible" in readme
    for split, (refs, en, es) in corpus.items():
        words = (sum(len(line.split()) for line in en), sum(len(line.split()) for line in es))
        assert f"| {split} | {len(refs):,} | {words[0]:,} | {words[1]:,} |" in readme
