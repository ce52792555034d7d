"""DESIGN.md's one rule, checked on the source: precompute -> shards <- train; merge imports neither stage."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {"shards": {"precompute", "train", "merge"}, "precompute": {"train", "merge"},
             "train": {"precompute", "merge"}, "merge": {"precompute", "train"}}


def imported_packages(path: str):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name.split(".")[0], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_rule(package):
    bad = []
    for root, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                bad += [f"{os.path.relpath(path, REPO)}:{line} imports {mod}"
                        for mod, line in imported_packages(path) if mod in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)
