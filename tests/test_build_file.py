"""BUILD must name every module and test file, so Bazel builds what setup.py installs."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("moe_tf", "models", "train", "benchmarks")


def read_build_targets(path=os.path.join(ROOT, "BUILD")):
    """Evaluates BUILD (a Starlark subset) and returns {kind: [target kwargs]}."""
    targets = {"py_library": [], "py_binary": [], "py_test": []}

    def rule(kind):
        return lambda **kwargs: targets[kind].append(kwargs)

    namespace = {kind: rule(kind) for kind in targets}
    namespace.update(glob=lambda patterns, **_: [], load=lambda *_, **__: None,
                     package=lambda **_: None, exports_files=lambda *_, **__: None)
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), namespace)  # Starlark is Python syntax
    return targets


def python_files(directory):
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, directory)):
        # train/data/bible holds the built-in corpus, no Python.
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "bible")]
        found += [os.path.relpath(os.path.join(dirpath, f), ROOT)
                  for f in filenames if f.endswith(".py")]
    return sorted(found)


def missing_from_build(build_path=os.path.join(ROOT, "BUILD")):
    """Python files of the packages and tests that no BUILD target lists."""
    targets = read_build_targets(build_path)
    listed = {src for kind in targets.values() for target in kind
              for src in target.get("srcs", [])}
    return [f for package in PACKAGES + ("tests",) for f in python_files(package)
            if f not in listed]


def test_every_module_is_in_a_target():
    assert missing_from_build() == [], "add these files to BUILD"
    targets = read_build_targets()
    absent = [src for kind in targets.values() for target in kind
              for src in target.get("srcs", []) if not os.path.exists(os.path.join(ROOT, src))]
    assert not absent, f"BUILD names files that do not exist: {absent}"


def test_every_test_file_has_a_py_test():
    targets = read_build_targets()
    tested = {src for target in targets["py_test"] for src in target["srcs"]
              if os.path.basename(src).startswith("test_")}
    test_files = [f for f in python_files("tests")
                  if os.path.basename(f).startswith("test_")]
    assert sorted(tested) == test_files


def test_a_module_left_out_of_build_is_reported(tmp_path):
    build = open(os.path.join(ROOT, "BUILD"), encoding="utf-8").read()
    assert '"moe_tf/gating.py",' in build
    broken = tmp_path / "BUILD"
    broken.write_text(build.replace('"moe_tf/gating.py",', ""), encoding="utf-8")
    assert missing_from_build(str(broken)) == ["moe_tf/gating.py"]
