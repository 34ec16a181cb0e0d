"""The translation binary end to end: data sources, BLEU, serving, translate, flags.

The tiny training runs start together (module fixture `runs`) so that their start-up
phases overlap; each test then waits for the run it checks.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import tensorflow as tf

from models.beam_search import beam_search
from models.special_tokens import BOS_ID, EOS_ID, PAD_ID
from models.translation_config import TRANSLATION_MOE, TranslationConfig
from models.translator import build_translator
from train.data import parallel, text
from train.data.tokenizer import SubwordTokenizer
from train.serving.nmt import TranslationServer
from train.serving.trained_model import restore_trained_model
from tests.binary_runner import check_refused, refused_setups_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
TFDS_MOCK_RUNNER = os.path.join(TESTS, "tfds_mock_runner.py")
BIBLE = os.path.join(ROOT, "train", "data", "bible")
BLEU_SENTENCES = 6
SENTENCES = ["In the beginning God created the heavens and the earth.",
             "And God said, Let there be light.",
             "zzzz qqqq ÆØÅ unknownword",
             ""]

# Serves SavedModels in a process where this project cannot be imported: the request is a
# list of [saved_model, inputs]; the response the list of their translations.
SERVE_SCRIPT = f"""
import json, sys
sys.path.insert(0, {TESTS!r})
from saved_model_runner import PROJECT_PACKAGES, _BlockProjectPackages
sys.meta_path.insert(0, _BlockProjectPackages())
import tensorflow as tf
import tensorflow_text  # noqa: F401
request, response = sys.argv[1:]
translations = []
with open(request) as f:
    for saved_model, inputs in json.load(f):
        serve = tf.saved_model.load(saved_model).signatures["serving_default"]
        outputs = serve(**{{name: tf.constant(values, tf.string)
                           for name, values in inputs.items()}})
        translations.append([t.decode("utf-8") for t in outputs["translation"].numpy()])
with open(response, "w") as f:
    json.dump(translations, f)
assert not any(m.split(".")[0] in PROJECT_PACKAGES for m in sys.modules)
"""


def nmt_command(model_dir, *flags):
    return [sys.executable, "-m", "train.nmt", "--preset=tiny", f"--model_dir={model_dir}",
            f"--bleu_sentences={BLEU_SENTENCES}", *flags]


class Run:
    """A subprocess started now, its output kept in files (pipes could fill and block)."""

    def __init__(self, command, directory, name, stdin=None):
        directory.mkdir(parents=True, exist_ok=True)
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=err, text=True,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
        if stdin is not None:
            self.process.stdin.write(stdin)
            self.process.stdin.close()

    def wait(self, timeout=900):
        self.process.wait(timeout=timeout)
        return (self.process.returncode, self.stdout_path.read_text(),
                self.stderr_path.read_text())

    def wait_ok(self):
        code, out, err = self.wait()
        assert code == 0, err[-3000:]
        return out


def write_lines(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def bible_lines(language, split, count):
    with gzip.open(os.path.join(BIBLE, f"{language}.{split}.txt.gz"), "rb") as f:
        return f.read().splitlines()[:count]


CORRUPT_PAIRS = [b"", b"no tab here", b"caf\xe9\tlatin-1 source", b"fine\t\xff\xfe broken",
                 b"\tempty source", b"empty target\t  "]
# What train.nmt --preset=tiny recorded before the MoE settings were one MoEConfig (and
# before --optimizer): the balanced gating listed noisy_gating (unread) as well.
LEGACY_RUN_CONFIG = {
    "model": {"architecture": "moe", "vocab_size": 512, "num_language_tokens": 0,
              "model_dim": 32, "attention_dim": 32, "num_experts": 4, "k": 2,
              "hidden_size": 32, "gating": "balanced", "noisy_gating": True,
              "importance_weight": 0.01, "load_weight": 0.01, "dropout": 0.1,
              "dispatch": "sparse", "dense_lstm_width": 0, "capacity_factor": None,
              "capacity_group_size": None},
    "data": "builtin:en-es", "valid_data": None, "test_data": None, "max_length": 24,
    "seed": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("nmt_runs")
    pairs = [en + b"\t" + es for en, es in zip(bible_lines("en", "train", 1300),
                                                bible_lines("es", "train", 1300))]
    write_lines(base / "train.tsv", pairs[:600] + CORRUPT_PAIRS + pairs[600:1100])
    write_lines(base / "valid.tsv", pairs[1100:1200])
    write_lines(base / "test.tsv", pairs[1200:])
    (base / "legacy").mkdir()
    (base / "legacy" / "run_config.json").write_text(json.dumps(LEGACY_RUN_CONFIG))
    commands = {
        "en-es": nmt_command(base / "en-es", "--train_steps=6"),
        # Also data parallel over two CPU devices, to show the strategies serve here.
        "es-en-dense": nmt_command(base / "es-en-dense", "--data=builtin:es-en",
                                   "--model=dense", "--dense_lstm_width=40",
                                   "--train_steps=3", "--export_dir=",
                                   "--bleu_sentences=0", "--strategy=mirrored",
                                   "--num_cpu_devices=2"),
        "multi": nmt_command(base / "multi", "--data=builtin:multi", "--train_steps=6"),
        "tsv": nmt_command(base / "tsv", f"--data=tsv:{base / 'train.tsv'}",
                           f"--valid_data={base / 'valid.tsv'}",
                           f"--test_data={base / 'test.tsv'}", "--train_steps=3",
                           "--export_dir=", "--bleu_sentences=0"),
        # A run dir recorded before MoEConfig, resumed with the flags that recorded it.
        "legacy": nmt_command(base / "legacy", "--train_steps=3", "--export_dir=",
                              "--bleu_sentences=0"),
        "tfds": [sys.executable, TFDS_MOCK_RUNNER, "train.nmt", "--preset=tiny",
                 "--data=tfds:wmt14_translate/fr-en", f"--model_dir={base / 'tfds'}",
                 "--vocab_size=256", "--train_steps=3", "--export_dir=",
                 "--bleu_sentences=0"],
    }
    return {name: (base / name, Run(command, base / "logs", name))
            for name, command in commands.items()}


def finished_run(runs, name):
    """The run's model_dir and metrics, once it has ended well."""
    model_dir, run = runs[name]
    run.wait_ok()
    with open(model_dir / "metrics.json") as f:
        return model_dir, json.load(f)


def check_metrics(metrics, steps, directions, bleu=True):
    assert metrics["global_step"] == steps
    assert metrics["directions"] == directions
    for key in ("final_train_loss", "valid_perplexity", "test_perplexity",
                "tokens_per_second", "ops_per_timestep",
                "params_excluding_embedding_softmax"):
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    if bleu:
        assert 0 <= metrics["bleu"] <= 100
    else:
        assert "bleu" not in metrics  # --bleu_sentences=0


def test_builtin_en_es_reports_sacrebleu_of_its_test_translations(runs):
    model_dir, metrics = finished_run(runs, "en-es")
    check_metrics(metrics, 6, ["en-es"])
    assert metrics["gating"] == "balanced" and metrics["model"] == "moe"
    assert metrics["skipped_lines"] == {"en-es": {"train": 0, "valid": 0, "test": 0}}
    with open(model_dir / "translations.en-es.tsv", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    sources, references, translations = zip(*rows)
    assert [s.encode() for s in sources] == bible_lines("en", "test", BLEU_SENTENCES)
    assert [r.encode() for r in references] == bible_lines("es", "test", BLEU_SENTENCES)
    assert metrics["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(list(translations), [list(references)]).score)


def test_builtin_es_en_dense_baseline_mirrored(runs):
    _, metrics = finished_run(runs, "es-en-dense")
    assert "strategy mirrored with 2 replicas" in runs["es-en-dense"][1].wait()[2]
    check_metrics(metrics, 3, ["es-en"], bleu=False)
    assert metrics["model"] == "dense" and metrics["lstm_width"] == 40


def test_builtin_multi_scores_both_directions(runs):
    model_dir, metrics = finished_run(runs, "multi")
    check_metrics(metrics, 6, ["en-es", "es-en"])
    assert metrics["gating"] == "top_k"
    with open(model_dir / "run_config.json") as f:
        moe = json.load(f)["model"]["moe"]
    assert (moe["gating"], moe["noisy_gating"], moe["threshold_loss_weight"]) == (
        "top_k", True, None)
    assert (moe["importance_weight"], moe["load_weight"]) == (0.01, 0.01)
    assert metrics["bleu"] == pytest.approx(
        (metrics["bleu_en-es"] + metrics["bleu_es-en"]) / 2)


def test_tsv_source_skips_and_counts_bad_pairs(runs):
    _, metrics = finished_run(runs, "tsv")
    check_metrics(metrics, 3, ["source-target"], bleu=False)
    assert metrics["skipped_lines"] == {
        "source-target": {"train": len(CORRUPT_PAIRS), "valid": 0, "test": 0}}


def test_run_recorded_before_moe_config_resumes_and_restores(runs):
    model_dir, metrics = finished_run(runs, "legacy")
    check_metrics(metrics, 3, ["en-es"], bleu=False)
    assert metrics["gating"] == "balanced"
    # The record is kept as it was written, and still restores the model.
    with open(model_dir / "run_config.json") as f:
        assert json.load(f) == LEGACY_RUN_CONFIG
    model = restore_trained_model(str(model_dir), TranslationConfig,
                                  build_translator).model
    assert model.config.moe == TRANSLATION_MOE.replace(num_experts=4, k=2, hidden_size=32)
    assert model.encoder_moe.gating == "balanced"


def test_tfds_wmt14_source_with_mock_data(runs):
    _, metrics = finished_run(runs, "tfds")
    check_metrics(metrics, 3, ["fr-en"], bleu=False)


# ------------------------------------------------------------------------------- serving

@pytest.fixture(scope="module")
def restored(runs):
    """`restored(run_name)`: the run's model, tokenizer and serving module, restored in
    this process from its checkpoint (once per run)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = restore(finished_run(runs, name)[0])
        return cache[name]

    return get


def restore(model_dir):
    with open(model_dir / "metrics.json") as f:
        metrics = json.load(f)
    model, tokenizer, *_ = restore_trained_model(str(model_dir), TranslationConfig,
                                                 build_translator)
    languages = ["en", "es"] if model.config.num_language_tokens else []
    return model, tokenizer, TranslationServer(
        model, tokenizer, beam_width=metrics["beam_width"],
        length_penalty=metrics["length_penalty"], target_languages=languages)


def serve_in_fresh_process(requests, tmp_path):
    """Translations of each (saved_model, inputs) request, all served by one process that
    has only TensorFlow and tensorflow-text."""
    script, request, response = (tmp_path / "serve.py", tmp_path / "request.json",
                                 tmp_path / "response.json")
    script.write_text(SERVE_SCRIPT)
    request.write_text(json.dumps([[str(path), inputs] for path, inputs in requests]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    served = subprocess.run([sys.executable, str(script), str(request), str(response)],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    return json.loads(response.read_text())


def in_process(server, texts, languages=None):
    inputs = [tf.constant(texts)] + ([tf.constant(languages)] if languages else [])
    return [t.decode("utf-8") for t in server.translate(*inputs)["translation"].numpy()]


MULTI_TEXTS, MULTI_LANGUAGES = SENTENCES[:2] * 2, ["es", "es", "en", "en"]


@pytest.fixture(scope="module")
def served_exports(runs, tmp_path_factory):
    """The en-es and multi runs' SavedModels served in one fresh process."""
    return dict(zip(("en-es", "multi"), serve_in_fresh_process(
        [(finished_run(runs, "en-es")[0] / "export", {"text": SENTENCES}),
         (finished_run(runs, "multi")[0] / "export",
          {"text": MULTI_TEXTS, "target_language": MULTI_LANGUAGES})],
        tmp_path_factory.mktemp("serve"))))


def test_saved_model_translates_like_the_trained_model_in_fresh_process(served_exports,
                                                                        restored):
    served = served_exports["en-es"]
    assert served == in_process(restored("en-es")[2], SENTENCES)
    assert len(served) == len(SENTENCES)


def test_multilingual_saved_model_serves_like_the_trained_model(served_exports, restored):
    assert served_exports["multi"] == in_process(restored("multi")[2], MULTI_TEXTS,
                                                 MULTI_LANGUAGES)


@pytest.fixture(scope="module")
def random_multilingual_server():
    """A random two-language model with large weights and loud language tokens: its
    translations are long and depend on the target language, so the checks below cannot
    pass by accident. (No Keras seeding here: it would invalidate the tokenizers other
    tests hold.)"""
    english = [f"the house number {i}" for i in range(30)]
    spanish = [f"la casa numero {i}" for i in range(30)]
    tokenizer = SubwordTokenizer.train(english + spanish, vocab_size=60)
    model = build_translator(TranslationConfig(
        vocab_size=tokenizer.vocab_size, num_language_tokens=2, model_dim=16,
        attention_dim=8, moe=TRANSLATION_MOE.replace(num_experts=4, k=2, hidden_size=16,
                                                     gating="top_k"), dropout=0.0))
    rng = np.random.default_rng(0)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0.0, 1.0, weight.shape).astype(np.float32))
    embeddings = model.embedding.embeddings.numpy()
    embeddings[tokenizer.vocab_size:] = rng.normal(0.0, 3.0, (2, 16))
    model.embedding.embeddings.assign(embeddings)
    server = TranslationServer(model, tokenizer, beam_width=3, length_penalty=0.6,
                               target_languages=["en", "es"])
    return tokenizer, model, server


RANDOM_TEXTS = ["the house number 3", "la casa numero 17 and more"]


def test_target_language_selects_the_language_token(random_multilingual_server):
    tokenizer, model, server = random_multilingual_server
    pieces = tokenizer.tokenize(tf.constant(RANDOM_TEXTS))
    translations = {}
    # The language tokens follow the subwords, in sorted language order.
    for language, token in (("en", tokenizer.vocab_size), ("es", tokenizer.vocab_size + 1)):
        source = parallel.source_sequences(
            pieces, language_tokens=tf.fill([2], token)).to_tensor()
        assert np.all(source[:, 0] == token)
        ids, _ = beam_search(model, source, beam_width=3, length_penalty_alpha=0.6,
                             max_lengths=2 * tf.cast(pieces.row_lengths(), tf.int32) + 10)
        expected = tokenizer.detokenize(tf.ragged.boolean_mask(
            ids, tf.logical_and(ids != PAD_ID, ids != EOS_ID))).numpy()
        translations[language] = in_process(server, RANDOM_TEXTS, [language] * 2)
        assert translations[language] == [t.decode("utf-8") for t in expected]
    assert all(translations["en"]) and all(
        en != es for en, es in zip(translations["en"], translations["es"]))
    # Each sentence of a batch goes into its own language.
    assert in_process(server, RANDOM_TEXTS, ["es", "en"]) == [translations["es"][0],
                                                              translations["en"][1]]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="target_language must be one of en, es"):
        server.translate(tf.constant(["a"]), tf.constant(["fr"]))


def test_exported_model_serves_identically_in_fresh_process(random_multilingual_server,
                                                             tmp_path):
    _, _, server = random_multilingual_server
    server.save(str(tmp_path / "export"))
    texts, languages = RANDOM_TEXTS + SENTENCES, ["es", "en"] * 3
    served, served_empty = serve_in_fresh_process(
        [(tmp_path / "export", {"text": texts, "target_language": languages}),
         (tmp_path / "export", {"text": [], "target_language": []})], tmp_path)
    expected = in_process(server, texts, languages)
    assert served == expected and all(expected[:2])
    assert served_empty == []


def translate_command(model_dir, *flags):
    return [sys.executable, "-m", "train.translate",
            f"--saved_model={model_dir / 'export'}", *flags]


def test_translate_binary_reads_stdin(runs, restored, tmp_path):
    model_dir, _ = finished_run(runs, "en-es")
    multi_dir, _ = finished_run(runs, "multi")
    lines = [SENTENCES[0], "", SENTENCES[1]]
    binaries = {
        "en-es": Run(translate_command(model_dir), tmp_path, "en-es",
                     stdin="\n".join(lines) + "\n"),
        "es": Run(translate_command(multi_dir, "--target_language=es"), tmp_path, "es",
                  stdin=SENTENCES[0] + "\n"),
        "missing": Run(translate_command(multi_dir), tmp_path, "missing", stdin="a\n"),
        "unknown": Run(translate_command(multi_dir, "--target_language=fr"), tmp_path,
                       "unknown", stdin="a\n"),
        # A translation model given to the language models' binary.
        "score": Run([sys.executable, "-m", "train.score",
                      f"--saved_model={model_dir / 'export'}"], tmp_path, "score",
                     stdin="a\n"),
    }
    expected = in_process(restored("en-es")[2], [lines[0], lines[2]])
    assert binaries["en-es"].wait_ok().split("\n")[:3] == [expected[0], "", expected[1]]
    expected = in_process(restored("multi")[2], SENTENCES[:1], ["es"])
    assert binaries["es"].wait_ok().split("\n")[:1] == expected
    for name, message in (("missing", "--target_language is required"),
                          ("unknown", "target_language must be one of en, es"),
                          ("score", "not a language model of train.lm")):
        code, _, err = binaries[name].wait()
        assert code != 0 and message in err, err[-1500:]
        assert "Traceback" not in err


# ---------------------------------------------------------------------- flags and data

# One of each way a bad value is caught (absl validators, enums, checks in main); the
# data-spec messages themselves are checked in-process below.
INVALID_FLAGS = [
    ("--data=builtin:fr-en", "Error: --data=builtin:fr-en"),
    ("--test_data=/nonexistent.tsv",
     "Error: --test_data applies to --data=tsv:PATH only; --data=builtin:en-es has "
     "held-out splits of its own."),
    ("--model_dim=33", "--model_dim must be even"),
    ("--num_groups=4", "--num_groups: the translation model's MoE layers are flat"),
    ("--length_penalty=-1", "--length_penalty must be >= 0"),
    ("--gating=random", "--gating"),
    ("--noisy_gating", "--noisy_gating does not apply to gating='balanced' (it applies to "
                       "gating='top_k')"),
]


refused_setups = refused_setups_fixture("train.nmt", ["--preset=tiny"], INVALID_FLAGS)


@pytest.mark.parametrize("flag,message", INVALID_FLAGS)
def test_invalid_flags_are_rejected_by_name(flag, message, refused_setups):
    check_refused(refused_setups, flag, message)


def test_incompatible_model_dir_is_refused_untouched(runs, tmp_path):
    model_dir, _ = finished_run(runs, "es-en-dense")
    before = {name: os.path.getmtime(model_dir / name) for name in os.listdir(model_dir)}
    code, _, err = Run(nmt_command(model_dir, "--data=builtin:es-en", "--model=moe"),
                       tmp_path, "refused").wait()
    assert code != 0 and "another configuration" in err and "--model" in err
    assert before == {name: os.path.getmtime(model_dir / name)
                      for name in os.listdir(model_dir)}


def test_tsv_hash_split_and_pair_parsing(tmp_path):
    lines = [f"source {i}\ttarget {i}".encode() for i in range(400)] + CORRUPT_PAIRS
    write_lines(tmp_path / "pairs.tsv", lines)
    (corpus,) = parallel.load_parallel_corpora(f"tsv:{tmp_path / 'pairs.tsv'}")
    clean = {name: list(text.clean_lines(getattr(corpus.splits, name)).as_numpy_iterator())
             for name in text.SPLITS}
    pairs = sorted(pair for split in clean.values() for pair in split)
    assert pairs == sorted((f"source {i}".encode(), f"target {i}".encode())
                           for i in range(400))
    assert 0 < len(clean["valid"]) < 40 and 0 < len(clean["test"]) < 40
    assert sum(text.count_invalid_lines(getattr(corpus.splits, name))
               for name in text.SPLITS) == len(CORRUPT_PAIRS)


def test_multilingual_batches_carry_each_directions_target_token():
    english = [f"the house number {i}" for i in range(30)]
    spanish = [f"la casa numero {i}" for i in range(30)]
    tokenizer = SubwordTokenizer.train(english + spanish, vocab_size=60)

    def corpus(source, target, sources, targets):
        pairs = tf.data.Dataset.from_tensor_slices((sources, targets))
        return parallel.ParallelCorpus(source, target, text.TextSplits(pairs, pairs, pairs))

    corpora = [corpus("en", "es", english, spanish), corpus("es", "en", spanish, english)]
    tokens = {"en": tokenizer.vocab_size, "es": tokenizer.vocab_size + 1}
    train, held_out = parallel.make_datasets(corpora, tokenizer, language_tokens=tokens,
                                             max_length=16, batch_tokens=64,
                                             shuffle_buffer=100, seed=0)
    spanish_ids = {tuple(ids) for ids in tokenizer.tokenize(tf.constant(spanish)).to_list()}
    seen = set()
    for source, target in list(train.take(20)) + list(held_out["valid"]):
        for source_row, target_row in zip(source.numpy(), target.numpy()):
            pieces = tuple(t for t in target_row if t not in (0, BOS_ID, EOS_ID))
            language = "es" if pieces in spanish_ids else "en"
            assert source_row[0] == tokens[language]
            assert EOS_ID in source_row and target_row[0] == BOS_ID
            seen.add(language)
    assert seen == {"en", "es"}


@pytest.mark.parametrize("spec,kwargs,message", [
    ("builtin:en-fr", {}, "builtin:en-es, builtin:es-en, builtin:multi"),
    ("hub:wmt", {}, "--data='hub:wmt': expected builtin:en-es"),
    ("tsv:", {}, "tsv:PATH needs a path"),
    ("tsv:/nonexistent/pairs.tsv", {}, "data file not found: /nonexistent/pairs.tsv"),
    (f"tsv:{BIBLE}/en.valid.txt.gz", {"valid_data": f"{BIBLE}/en.test.txt.gz"},
     "--valid_data and --test_data go together"),
])
def test_bad_data_specs_are_named(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        parallel.load_parallel_corpora(spec, **kwargs)
