"""The source's shape, checked: which package imports which (precompute -> shards <- train; merge imports neither
stage; the common plumbing imports nothing of the format; no stage imports the benchmarks, and each benchmark
module reaches at most one stage), which third-party libraries each package uses, no import cycles between the
project's modules, and no module over 400 lines."""
import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("shards", "precompute", "train", "merge", "bench")
STAGES = ("precompute", "train", "merge")
FORBIDDEN = {"shards": {"precompute", "train", "merge", "bench"}, "precompute": {"train", "merge", "bench"},
             "train": {"precompute", "merge", "bench"}, "merge": {"precompute", "train", "bench"}, "bench": set()}
# Each stage's benchmark module and the one stage it may reach (its own imports and theirs); every other module
# of bench (the drivers `python -m bench` and bench.gpu_check, and what the stage modules share) reaches none.
STAGE_BENCHES = {"bench.train_step": "train", "bench.stream": "train", "bench.load": "train", "bench.memory": "train",
                 "bench.precompute": "precompute", "bench.precompute_memory": "precompute", "bench.merge": "merge"}
# Third-party libraries each package may import (the standard library and torch everywhere). Test-only and
# demo helpers are listed with the package that holds them.
THIRD_PARTY = {
    "shards.common": {"omegaconf", "huggingface_hub"},
    "shards": {"safetensors", "webdataset", "numpy"},
    # PIL for images; braceexpand for tar patterns (webdataset's own dependency); tokenizers, sentencepiece and
    # scikit-image build the tiny model's tokenizers and the sample photos (precompute.tiny)
    "precompute": {"transformers", "diffusers", "bitsandbytes", "PIL", "numpy", "tqdm", "braceexpand", "tokenizers",
                   "sentencepiece", "skimage"},
    # transformers only for its optimizers (never a text encoder: a test trains without any)
    "train": {"diffusers", "peft", "bitsandbytes", "accelerate", "safetensors", "PIL", "numpy", "tqdm", "braceexpand",
              "transformers"},
    "merge": {"safetensors", "diffusers", "tqdm"},
    # diffusers and transformers build the random-weight models; safetensors writes the merge row's LoRA and
    # compares gpu-check's LoRA files; numpy checks gpu-check's sampled image
    "bench": {"diffusers", "transformers", "safetensors", "numpy"},
}
MAX_LINES = 400


def _modules():
    """{dotted module name: path} of every module of the four packages."""
    out = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return out


MODULES = _modules()


def _imports(module: str):
    """(absolute name, line) of every import in a module, wherever it is (a function's import can make a
    cycle too: it only moves the moment it happens)."""
    path = MODULES[module]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                yield (f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base), node.lineno


def _owner(module: str) -> str:
    return "shards.common" if module.startswith("shards.common") else module.split(".")[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_follow_the_rule(package):
    bad = [f"{m}:{line} imports {name}" for m in MODULES if m.split(".")[0] == package
           for name, line in _imports(m) if name.split(".")[0] in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def _reached(module: str, graph) -> set:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    return seen


def test_each_benchmark_module_reaches_at_most_its_own_stage():
    graph = {m: {name for name, _ in _imports(m) if name in MODULES} for m in MODULES}
    stage_of = {m: {n.split(".")[0] for n in _reached(m, graph) if n.split(".")[0] in STAGES}
                for m in MODULES if m.split(".")[0] == "bench"}
    bad = [f"{m} reaches {', '.join(sorted(got))}" for m, got in stage_of.items()
           if got - {STAGE_BENCHES.get(m)}]
    assert not bad, "\n".join(bad)
    assert {m: stage_of.get(m) for m in STAGE_BENCHES} == {m: {s} for m, s in STAGE_BENCHES.items()}
    assert stage_of["bench.driver"] == set() and stage_of["bench.gpu_check"] == set()


def test_the_common_plumbing_imports_nothing_of_the_format():
    bad = [f"{m}:{line} imports {name}" for m in MODULES if _owner(m) == "shards.common"
           for name, line in _imports(m) if name.startswith("shards") and _owner(name) != "shards.common"]
    assert not bad, "\n".join(bad)


def test_third_party_imports_are_the_ones_each_package_may_use():
    own, std = set(PACKAGES), set(sys.stdlib_module_names) | {"torch"}
    bad = []
    for m in MODULES:
        for name, line in _imports(m):
            top = name.split(".")[0]
            if top not in own and top not in std and top not in THIRD_PARTY[_owner(m)]:
                bad.append(f"{m}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {name for name, _ in _imports(m) if name in MODULES and name != m} for m in MODULES}
    cycles, done = [], set()

    def visit(m, path):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_over_400_lines():
    long = {m: n for m, path in MODULES.items() if (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert not long, long
