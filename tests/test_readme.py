"""The README and docs/ pages: the layer examples run as written, every documented
`--flag` exists in the command that the line or page names, and every relative link
resolves (to a file, and to a heading of it when it names one)."""

import functools
import glob
import importlib
import os
import re

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = [README] + DOCS

# The training and serving binaries (absl flags, defined by `define_flags`), by module and
# by console script.
ABSL_BINARIES = ("train.lm", "train.nmt", "train.score", "train.translate")
CONSOLE_SCRIPTS = {"moe-train-lm": "train.lm", "moe-score-lm": "train.score",
                   "moe-train-nmt": "train.nmt", "moe-translate": "train.translate"}
# Other command lines, whose flags are read from their source (argparse, bash): one file,
# or a tuple of the files that define them.
SOURCE_COMMANDS = {
    "benchmarks.layer_bench": "benchmarks/layer_bench.py",
    "benchmarks.memory_bench": "benchmarks/memory_bench.py",
    "benchmarks.profile_layer": "benchmarks/profile_layer.py",
    "benchmarks.lm_table": ("benchmarks/lm_table.py", "benchmarks/results_table.py"),
    "benchmarks.dtensor_comm": "benchmarks/dtensor_comm.py",
    "benchmarks.serving_bench": "benchmarks/serving_bench.py",
    "benchmarks.router_table": ("benchmarks/router_table.py",
                                "benchmarks/results_table.py"),
    "benchmarks.keras_hub_bench": "benchmarks/keras_hub_bench.py",
    "benchmarks.quantized_experts_bench": "benchmarks/quantized_experts_bench.py",
    "benchmarks.hierarchical_probe": "benchmarks/hierarchical_probe.py",
    "train.data.bible_corpus": "train/data/bible_corpus.py",
    "train.data.manuals_corpus": "train/data/manuals_corpus.py",
    "benchmarks/gpu_check.sh": "benchmarks/gpu_check.sh",
}
# Commands of other tools that the pages show, with the flags they use.
OTHER_TOOLS = {"tensorboard": {"logdir"}}
# The binaries whose flags a page may name outside a command line; other pages may name
# any command's flags.
PAGE_BINARIES = {
    "docs/training.md": ("train.lm", "train.score"),
    "docs/translation.md": ("train.nmt", "train.translate"),
}

FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
# A command: `python -m MODULE ...`, a console script or a script, up to the end of the
# line or code span, a pipe, a redirection or a comment.
COMMAND = re.compile(r"(?:python -m ([\w.]+)|(?<![\w/.-])(moe-[a-z-]+|tensorboard|"
                     r"benchmarks/gpu_check\.sh))([^`|<>;#\n]*)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def relative(path):
    return os.path.relpath(path, ROOT)


@functools.lru_cache(maxsize=None)
def defined_flags(module):
    """{name: is boolean} of every flag `module` defines (in a FlagValues of its own, not
    absl's FLAGS)."""
    flag_values = flags.FlagValues()
    importlib.import_module(module).define_flags(flag_values)
    return {name: isinstance(flag_values[name], flags.BooleanFlag) for name in flag_values}


# The flags absl.app adds to every binary (logging and help), real in the binaries'
# command lines though no module of the project defines them.
ABSL_APP_FLAGS = {"verbosity", "logger_levels", "helpfull", "helpshort"}


def absl_flags(module):
    """The flags `module` takes: those it defines, --noNAME for a boolean NAME, and
    absl.app's own."""
    defined = defined_flags(module)
    return (set(defined) | {"no" + name for name, boolean in defined.items() if boolean}
            | ABSL_APP_FLAGS)


@functools.lru_cache(maxsize=None)
def source_flags(paths):
    """The flags an argparse program or bash script spells out as string literals in its
    file, or in any of a tuple of files."""
    return set().union(*(
        re.findall(r"""["'](?:--)([A-Za-z][\w-]*)["']""", read(os.path.join(ROOT, path)))
        for path in ((paths,) if isinstance(paths, str) else paths)))


def command_flags(command):
    if command in ABSL_BINARIES:
        return absl_flags(command)
    if command in SOURCE_COMMANDS:
        return source_flags(SOURCE_COMMANDS[command])
    return OTHER_TOOLS.get(command)


def every_flag():
    names = set().union(*(absl_flags(m) for m in ABSL_BINARIES))
    names |= set().union(*(source_flags(p) for p in SOURCE_COMMANDS.values()))
    return names.union(*OTHER_TOOLS.values())


def commands(text):
    """(command, flags, the matched text) of every command line, with shell line
    continuations joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    for match in COMMAND.finditer(text):
        command = match.group(1) or CONSOLE_SCRIPTS.get(match.group(2), match.group(2))
        yield command, FLAG.findall(match.group(3)), match.group(0)


def test_readme_layer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", read(README), re.S)
    assert len(blocks) >= 2, "README.md has no layer example and MoEConfig example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["moe"].balance_statistics()["load_fraction"].shape == (16,)
    assert len(namespace["history"].history["moe_cv_importance"]) == 2
    # The MoEConfig alternative, right after it.
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    assert namespace["moe"].config is namespace["config"]
    assert namespace["config"].capacity_factor == 2.0


def test_layer_page_config_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", read(os.path.join(ROOT, "docs", "layer.md")),
                        re.S)
    namespace = {}
    exec(compile(blocks[0], "docs/layer.md", "exec"), namespace)
    assert namespace["layer"].config == namespace["same"].config


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(os.path.join(ROOT, target.split("#")[0]))
              for target in LINK.findall(read(README))}
    assert DOCS, "docs/ has no pages"
    assert [relative(p) for p in DOCS if p not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_flags_on_command_lines_exist_in_that_command(page):
    unknown = []
    for command, names, line in commands(read(page)):
        known = command_flags(command)
        if known is None:
            assert not names, f"{relative(page)}: flags of an unknown command: {line!r}"
            continue
        unknown += [f"--{name} ({command})" for name in names if name not in known]
    assert unknown == [], f"{relative(page)} documents flags that do not exist"


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_flags_in_the_text_exist(page):
    """Flags outside command lines: those of the page's binaries on the binaries' own
    pages, those of any command elsewhere."""
    text = re.sub(r"\\\n\s*", " ", read(page))
    prose = COMMAND.sub(" ", text)
    binaries = PAGE_BINARIES.get(relative(page))
    known = (set().union(*(absl_flags(b) for b in binaries)) if binaries
             else every_flag())
    unknown = sorted({name for name in FLAG.findall(prose) if name not in known})
    assert unknown == [], f"{relative(page)} documents flags that do not exist"


def test_the_binaries_pages_document_their_flags():
    """Every flag of train.lm is on the training page, and every flag that only train.nmt
    has is on the translation page."""
    def named_on(page):
        return set(FLAG.findall(read(os.path.join(ROOT, "docs", page))))

    lm, nmt = set(defined_flags("train.lm")), set(defined_flags("train.nmt"))
    assert sorted(lm - named_on("training.md")) == []
    assert sorted(nmt - lm - named_on("translation.md")) == []


def heading_anchors(text):
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to
    hyphens)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(read(page)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = (os.path.normpath(os.path.join(os.path.dirname(page), path)) if path
                    else page)
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and anchor not in heading_anchors(read(resolved)):
            broken.append(target)
    assert broken == [], f"{relative(page)} has broken links"


def test_the_checks_catch_a_made_up_flag_and_a_misplaced_one():
    made_up = "python -m train.lm --model_dir=/tmp/x --no_such_flag=1"
    assert [n for c, names, _ in commands(made_up) for n in names
            if n not in command_flags(c)] == ["no_such_flag"]
    # --beam_width is train.nmt's, not train.lm's.
    misplaced = "python -m train.lm \\\n    --beam_width=2"
    assert [n for c, names, _ in commands(misplaced) for n in names
            if n not in command_flags(c)] == ["beam_width"]
    assert "capacity-factor" in command_flags("benchmarks.layer_bench")
    assert "cpu" in command_flags("benchmarks/gpu_check.sh")
