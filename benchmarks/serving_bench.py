"""Exported SavedModels served as a user serves them: throughput and latency.

    python -m benchmarks.serving_bench --model moe=runs/lm_moe/export \
        --model 4xlstm=runs/lm_4xlstm/export --json serving.json
    python -m benchmarks.serving_bench --model nmt=runs/nmt/export --sentences 256

Each SavedModel is measured in a fresh process of its own that imports only TensorFlow,
tensorflow_text and NumPy (as a serving process would), on the built-in test sentences
(train/data/bible/en.test.txt.gz, read directly):

- a language model (`train.lm` export): scoring throughput (sentences/s) and the p50 /
  p99 latency of one call, at each `--batch_sizes`; `generate` tokens/s for
  `--generate_batch_sizes` prompts of `--prompt_words` words (each a test sentence's
  first words, running on into the next sentences) and `--new_tokens` tokens
  (`--new_tokens 1`: the p50 is the time to the first token); and the test perplexity of
  the export over the whole built-in test split (so that exports of one model with
  experts stored in float32, bfloat16 or int8, `--export_expert_dtype`, compare);
- a translation model (`train.nmt` export): translation sentences/s and latency at each
  batch size (at the beam width the model was exported with).

The serving processes run with TensorFlow's pooling CPU allocator
(`TF_CPU_ALLOCATOR_USE_BFC=true`, what importing moe_tf selects, and what a serving process
should set: a batch's `[tokens, vocabulary]` logits are fresh memory at every call otherwise);
`--allocator unpooled` maps every large tensor afresh (TensorFlow's default where oneDNN
is off). Every batch size is warmed up by one call (tracing) before it is timed. The
sentences are taken in corpus order, so a batch holds sentences of mixed length, as
requests do. The export's size on disk is reported for every model. Prints a Markdown
table; `--json` writes the numbers.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SENTENCES = os.path.join(ROOT, "train", "data", "bible", "en.test.txt.gz")
_RESULT_PREFIX = "SERVING_BENCH_RESULT "


def test_sentences(count: int = 0) -> List[bytes]:
    """`count` built-in test sentences in corpus order, repeated if needed; 0: each once."""
    with gzip.open(TEST_SENTENCES, "rb") as f:
        lines = [line.strip() for line in f if line.strip()]
    return (lines * (count // len(lines) + 1))[:count or len(lines)]


def directory_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names) / 2**20


def test_perplexity(serve, batch_size: int = 256) -> float:
    """exp(mean NLL per scored token) of a language-model export over the test split."""
    import numpy as np
    import tensorflow as tf

    sentences = test_sentences()
    log_prob = num_tokens = 0.0
    for i in range(0, len(sentences), batch_size):
        out = serve(text=tf.constant(sentences[i:i + batch_size]))
        valid = out["valid_utf8"].numpy()
        log_prob += float(np.sum(out["log_prob"].numpy()[valid]))
        num_tokens += float(np.sum(out["num_tokens"].numpy()[valid]))
    return float(np.exp(-log_prob / num_tokens))


def percentile(values: List[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def time_calls(call, batches) -> Dict[str, float]:
    """Calls `call(batch)` on each batch after one warm-up call; the latencies' p50 and
    p99 (ms) and the items per second over all calls."""
    call(batches[0])
    latencies, items = [], 0
    for batch in batches:
        start = time.perf_counter()
        items += call(batch)
        latencies.append(time.perf_counter() - start)
    return {"per_second": items / sum(latencies),
            "p50_ms": 1e3 * percentile(latencies, 0.5),
            "p99_ms": 1e3 * percentile(latencies, 0.99)}


def measure(path: str, args) -> Dict:
    """In the child process: the SavedModel at `path`, every measurement."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the tokenizer's ops)

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    inputs = serve.structured_input_signature[1]
    sentences = test_sentences(args.sentences)
    is_translator = "translation" in serve.structured_outputs
    results = {"kind": "translation" if is_translator else "language_model",
               # TensorFlow's variable, read here without importing the project.
               "allocator": ("pooled" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") == "true"
                             else "unpooled"),
               "scoring" if not is_translator else "translation": {},
               "size_mib": directory_mib(path)}
    if not is_translator:
        results["test_perplexity"] = test_perplexity(serve)

    for batch_size in args.batch_sizes:
        batches = [tf.constant(sentences[i:i + batch_size])
                   for i in range(0, len(sentences) - batch_size + 1, batch_size)]
        def call(batch):
            # A multilingual translator also takes each sentence's target language.
            extra = ({"target_language": tf.fill([len(batch)], "es")}
                     if "target_language" in inputs else {})
            serve(text=batch, **extra)
            return int(batch.shape[0])

        key = "translation" if is_translator else "scoring"
        results[key][batch_size] = time_calls(call, batches)

    if not is_translator and "generate" in loaded.signatures:
        generate = loaded.signatures["generate"]
        results["generate"] = {}
        for batch_size in args.generate_batch_sizes:
            # As many prompts as the calls take, whatever --sentences is.
            prompts = prompts_of_words(test_sentences(batch_size * args.generate_calls),
                                       args.prompt_words)
            batches = [tf.constant(prompts[i:i + batch_size])
                       for i in range(0, len(prompts), batch_size)]

            def call(batch):
                out = generate(prompt=batch, max_new_tokens=tf.constant(args.new_tokens),
                               temperature=tf.constant(1.0), seed=tf.constant(0))
                return int(np.sum(out["num_tokens"].numpy()))

            results["generate"][batch_size] = time_calls(call, batches)
    return results


def prompts_of_words(sentences: List[bytes], words: int) -> List[bytes]:
    """One prompt per sentence: the `words` words of the text from its start on."""
    text, starts = [], []
    for sentence in sentences:
        starts.append(len(text))
        text += sentence.split()
    return [b" ".join(text[start:start + words]) for start in starts]


def child_environment(allocator: str) -> Dict[str, str]:
    """The serving process's environment: TensorFlow's pooling CPU allocator ("pooled",
    bounded by the machine's memory) or every large tensor mapped afresh ("unpooled",
    TensorFlow's default where oneDNN is off)."""
    from moe_tf import cpu_allocator  # here only: the serving process imports none of it

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    env.update({cpu_allocator.USE_POOL: "true"} if allocator == "pooled"
               else cpu_allocator.UNPOOLED)
    env.setdefault(cpu_allocator.POOL_LIMIT_MIB, str(cpu_allocator.physical_memory_mib()))
    return env


def run_child(name: str, path: str, argv: List[str], allocator: str) -> Dict:
    """Measures one SavedModel in a fresh process running this file with --child."""
    env = child_environment(allocator)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path,
                             *argv], capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{name} ({path}) failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT_PREFIX):])


def markdown(results: Dict[str, Dict]) -> str:
    sizes = ["| model | export MiB | test perplexity |", "| --- | --- | --- |"]
    for name, result in results.items():
        perplexity = result.get("test_perplexity")
        sizes.append(f"| {name} | {result['size_mib']:.2f} | "
                     f"{'-' if perplexity is None else f'{perplexity:.3f}'} |")
    rows = ["", "| model | measurement | batch | per second | p50 ms | p99 ms |",
            "| --- | --- | --- | --- | --- | --- |"]
    units = {"scoring": "sentences scored", "translation": "sentences translated",
             "generate": "tokens generated"}
    for name, result in results.items():
        for key, unit in units.items():
            for batch, numbers in result.get(key, {}).items():
                rows.append(f"| {name} | {unit} | {batch} | {numbers['per_second']:.1f} "
                            f"| {numbers['p50_ms']:.1f} | {numbers['p99_ms']:.1f} |")
    return "\n".join(sizes + rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[],
                        help="NAME=SAVED_MODEL_DIR; repeat for several.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch_sizes", type=lambda s: [int(v) for v in s.split(",")],
                        default=[1, 32, 256])
    parser.add_argument("--sentences", type=int, default=1024,
                        help="Test sentences scored at each batch size (the corpus "
                             "repeats if needed).")
    parser.add_argument("--generate_batch_sizes",
                        type=lambda s: [int(v) for v in s.split(",")], default=[1, 32])
    parser.add_argument("--generate_calls", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_words", type=int, default=4,
                        help="Words of each generate prompt.")
    parser.add_argument("--allocator", choices=("pooled", "unpooled"), default="pooled",
                        help="TensorFlow's CPU allocator in the serving processes: its "
                             "pool (TF_CPU_ALLOCATOR_USE_BFC=true) or every large tensor "
                             "mapped afresh (moe_tf.cpu_allocator.UNPOOLED)")
    parser.add_argument("--json", help="Write the results here.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(_RESULT_PREFIX + json.dumps(measure(args.child, args)), flush=True)
        os._exit(0)  # TensorFlow's threads can delay a normal exit
    if not args.model:
        raise SystemExit("serving_bench: give at least one --model NAME=SAVED_MODEL_DIR")
    child_argv = ["--batch_sizes", ",".join(map(str, args.batch_sizes)),
                  "--sentences", str(args.sentences),
                  "--generate_batch_sizes", ",".join(map(str, args.generate_batch_sizes)),
                  "--generate_calls", str(args.generate_calls),
                  "--new_tokens", str(args.new_tokens),
                  "--prompt_words", str(args.prompt_words)]
    results = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not os.path.isdir(path):
            raise SystemExit(f"serving_bench: --model {spec}: no directory {path}")
        results[name] = run_child(name, path, child_argv, args.allocator)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
