"""Count llmq's import cycles and upward imports with grimp (the graph import-linter checks).

    python scripts/import_graph.py                     # layers as pyproject.toml's import-linter contract lists them
    python scripts/import_graph.py --layer llmq.cli=0 --layer llmq.pipeline=1 ...   # any other layering

A cycle is a set of modules that import each other in a loop (a strongly connected component of more than one
module; imports inside functions count, as they do for import-linter). An upward import is one from a module
of a lower layer into a module of a higher one. With --layer options, PREFIX=LEVEL puts every module under
PREFIX on LEVEL (0 = top; the longest matching prefix wins); modules matching none are ignored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def layers_from_pyproject() -> dict[str, int]:
    """PREFIX -> level from the first `layers` contract (top first; 'a | b' are siblings on one level)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract["type"] == "layers":
            levels = {}
            for level, entry in enumerate(contract["layers"]):
                for name in entry.replace(":", "|").split("|"):
                    levels[name.strip()] = level
            return levels
    raise SystemExit("pyproject.toml has no import-linter layers contract")


def level_of(module: str, levels: dict[str, int]) -> int | None:
    matches = [prefix for prefix in levels if module == prefix or module.startswith(prefix + ".")]
    return levels[max(matches, key=len)] if matches else None


def cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", action="append", default=[], metavar="PREFIX=LEVEL")
    args = parser.parse_args()
    levels = {k: int(v) for k, v in (item.split("=") for item in args.layer)} or layers_from_pyproject()

    graph = grimp.build_graph("llmq")
    modules = {m for m in graph.modules if m == "llmq" or m.startswith("llmq.")}
    loops = cycles(graph, modules - {"llmq"})  # the package's face re-exports the API: not a layer
    upward = []
    for importer in sorted(modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & modules):
            a, b = level_of(importer, levels), level_of(imported, levels)
            if a is not None and b is not None and b < a:
                upward.append((importer, imported))
    print(f"modules: {len(modules)}")
    print(f"import cycles: {len(loops)}")
    for loop in loops:
        print(f"  {' <-> '.join(loop)}")
    print(f"upward imports: {len(upward)}")
    for importer, imported in upward:
        print(f"  {importer} -> {imported}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
