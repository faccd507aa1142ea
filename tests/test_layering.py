"""The package's layers: imports run one way, top to bottom, and never in a circle.

Every module under tinylora/ is parsed with ``ast``; every import (top-level or inside a
function: a lazy import is still a dependency) is resolved to the tinylora module it names.
The test fails on an import from a lower layer into a higher one, and on any circle of
imports between modules, naming the modules and the rule.
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tinylora"

# The layer order, top to bottom, written once (docs/architecture.md points here). A module
# belongs to the layer of its first name under tinylora (tinylora.lora.inject -> "lora").
# A module may import modules of its own layer or of any layer below it, never above.
LAYERS = [
    ("cli",),                                         # `tinylora ...`, thin over apps
    ("apps",),                                        # demo, finetune, classify, bench
    ("train", "checkpoint", "viz"),                   # the training loop, checkpoint folders, plots
    ("models", "lora", "quant", "optim", "data"),     # what is trained and what it is trained on
    ("nn",),                                          # Module, Linear, attention, blocks
    ("functional", "kernels", "gradcheck", "opcheck", "memory"),  # composite ops, fast kernels,
                                                      # checks, what a graph keeps
    ("ops",),                                         # primitives: forward and backward
    ("dispatch",),                                    # reference op -> registered fast kernel
    ("tensor",),                                      # Tensor, the graph, backward
    ("blas", "io", "configs", "hints"),               # GEMM with accumulation; files; configs;
                                                      # errors that name their fix as a setting
    ("backend",),                                     # numpy / cupy, devices, dtypes, RNG
    ("guard", "version"),                             # the device guard (NumPy, CuPy's rules)
]
RANK = {name: i for i, group in enumerate(LAYERS) for name in group}

# Circles tolerated for now: (module, module) pairs, both ways. None left.
KNOWN_CIRCLES: set = set()


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: dict) -> set[str]:
    """The tinylora modules ``name`` imports (relative imports resolved; ``from pkg import x``
    names the submodule pkg.x where one exists, else pkg itself)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:      # `import tinylora.x.y` where y is a name: its module
                t = t.rpartition(".")[0]
            if t.startswith("tinylora") and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None     # None: the package root


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in sorted(graph.items()):
        if _layer(src) is None:       # tinylora/__init__.py re-exports the layers: tl.nn, ...
            continue
        for dst in sorted(targets):
            a, b = _layer(src), _layer(dst)
            if b is None:
                out.append(f"{src} imports the package root {dst} (import the module itself)")
            elif RANK[b] < RANK[a]:
                out.append(f"{src} (layer {a!r}) imports {dst} (layer {b!r}), a higher layer: "
                           f"imports run {' -> '.join('/'.join(g) for g in LAYERS)}")
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    return comps


def _without_known_circles(graph):
    return {s: {d for d in ds if frozenset({s, d}) not in KNOWN_CIRCLES} for s, ds in graph.items()}


def test_every_module_has_a_layer():
    missing = sorted({_layer(m) for m in _modules()} - set(RANK) - {None})
    assert not missing, f"modules in no layer (add them to LAYERS in tests/test_layering.py): {missing}"


def test_no_import_from_a_lower_layer_into_a_higher_one():
    bad = _layer_violations(import_graph())
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_no_import_circles():
    comps = _circles(_without_known_circles(import_graph()))
    assert not comps, "import circles (break each: move the shared piece down a layer):\n  " + \
        "\n  ".join(" <-> ".join(c) for c in comps)


def test_the_checks_catch_what_they_should(tmp_path):
    graph = {"tinylora.nn.layers": {"tinylora.models.gpt"}, "tinylora.models.gpt": {"tinylora.nn.layers"},
             "tinylora.io": {"tinylora.configs"}, "tinylora.configs": {"tinylora.io"},
             "tinylora.ops.arith": {"tinylora.tensor"}, "tinylora.tensor": set()}
    bad = _layer_violations(graph)
    assert bad == [f"tinylora.nn.layers (layer 'nn') imports tinylora.models.gpt (layer 'models'), "
                   f"a higher layer: imports run {' -> '.join('/'.join(g) for g in LAYERS)}"]
    assert sorted(_circles(graph)) == [["tinylora.configs", "tinylora.io"],
                                       ["tinylora.models.gpt", "tinylora.nn.layers"]]
    # a lazy import inside a function counts, and relative imports resolve
    pkg = tmp_path / "tinylora"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nn" / "__init__.py").write_text("")
    src = pkg / "nn" / "layers.py"
    src.write_text("def f():\n    from ..models import gpt\n    from .. import backend\n")
    known = {"tinylora", "tinylora.nn", "tinylora.nn.layers", "tinylora.models",
             "tinylora.models.gpt", "tinylora.backend"}
    assert _imports("tinylora.nn.layers", src, known) == {"tinylora.models.gpt", "tinylora.backend"}


def test_importing_tinylora_leaves_the_process_alone():
    """No allocator tuning at import: the trainer and the command line ask for it."""
    code = ("import tinylora, tinylora.models, tinylora.lora, tinylora.quant, tinylora.train\n"
            "from tinylora import backend\n"
            "assert backend.malloc_tuned is False, 'mallopt was called at import'\n"
            "tuned = backend.tune_malloc()\n"
            "assert backend.tune_malloc() == tuned == backend.malloc_tuned   # idempotent\n"
            "print(tuned)")
    env = {k: v for k, v in os.environ.items() if k != "TINYLORA_MALLOC_TUNING"}
    env["PYTHONPATH"] = str(PACKAGE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert out.stdout.strip() in ("True", "False")
    env["TINYLORA_MALLOC_TUNING"] = "0"
    off = subprocess.run([sys.executable, "-c", code.replace("print(tuned)", "assert not tuned")],
                         env=env, capture_output=True, text=True)
    assert off.returncode == 0, off.stderr
