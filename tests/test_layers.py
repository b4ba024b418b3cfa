"""Layering (DESIGN.md, "Layout"): every import in vtp_fast/ and kernels/, including those inside functions, points
down the layer table below, and the package-level import graph has no cycles.

Layers, bottom up: kernels/csrc <- ops <- nn <- models; losses use ops; data uses none of these; train uses models,
losses, data, never eval; eval uses models and data, never train; what needs both train and eval (the generative
probe, pretraining with its evaluations: the CLI, the study) sits in a layer above both; so does measure, which builds,
traces and times their work (the planners, the profiler, the study's FLOP counts), below the study and the CLI. A
violation too big to fix where it was found goes in KNOWN with its reason and the issue item that removes it; an
entry that is no longer needed fails too, so the list can only shrink.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Module -> layer, by longest dotted prefix. A module under vtp_fast/ or kernels/ that matches none fails
# test_every_module_has_a_layer: a new package has to be placed in the table before it can land.
LAYER_OF = {
    # Below everything: each imports nothing from vtp_fast, and every layer may need it.
    "vtp_fast.config": "base",  # typed configs and the UserError family: every layer raises or reads them
    "vtp_fast.io": "base",  # atomic writes (checkpoints, shards, caches): stdlib only
    "vtp_fast.optional": "base",  # the one place each optional dependency is probed (convention 2): a boolean each
    "vtp_fast.constants": "base",  # the published input normalisation: data, models and losses all apply it
    "vtp_fast.text": "base",  # the CLIP BPE tokenizer: the text tower's input format, used by data and the model
    "vtp_fast.threads": "base",  # the thread budget (torch threads, loader workers, DALI threads): stdlib and torch
    "vtp_fast.allocator": "base",  # how malloc keeps freed memory (page faults): stdlib only, set by the command line
    # kernels/ is installed as vtp_fast.kernels; vtp_fast._C is csrc/ built by CMake: the same layer.
    "vtp_fast.kernels": "kernels",
    "vtp_fast._C": "kernels",
    "vtp_fast.ops": "ops",
    "vtp_fast.nn": "nn",
    "vtp_fast.models": "models",
    "vtp_fast.losses": "losses",
    "vtp_fast.data": "data",
    # Process groups and collectives (no-ops on one process); the apply_ddp / apply_fsdp transforms of a built model.
    "vtp_fast.distributed": "distributed",
    "vtp_fast.compile": "compile",  # apply_compile: a transform of a built model, applied by the entry point
    "vtp_fast.plots": "plots",  # PNG curves and image grids (matplotlib): runs, benchmarks and evaluations draw them
    "vtp_fast.eval": "eval",
    "vtp_fast.train": "train",
    # Measuring: benchmark rows and ceilings, the performance model, the kernels' compile gate, the planners, the
    # step profiler, the study's FLOP counts.
    "vtp_fast.measure": "measure",
    "vtp_fast.downstream": "downstream",
    "vtp_fast.study": "study",
    "vtp_fast.cli": "cli",
    "vtp_fast": "api",  # the package's __init__: the public names (VTP, load_pretrained, ...)
}

# Layer -> the layers its modules may import directly (its own layer is always allowed). Written out rather than
# derived, so that skipping a layer (train importing kernels, say) is a decision made here.
RANKS = {
    "base": set(),
    "kernels": set(),  # DESIGN: kernels/ has no model or config imports (Triton and torch only)
    "ops": {"kernels", "base"},  # the dispatch layer: the only one that reaches kernels/csrc
    "nn": {"ops", "base"},
    "models": {"nn", "ops", "base"},  # architectures only: no data, no losses, no process groups (convention 4)
    "losses": {"ops", "distributed", "base"},  # ops, plus collectives for global CLIP / DINO batches; never models
    "data": {"base"},  # uses neither models nor ops
    "distributed": {"base"},
    "compile": {"models", "nn", "ops", "base"},
    "plots": {"data", "base"},
    # eval and train are siblings: eval uses models and data, never train; train uses models, losses and data, never
    # eval (pretraining's held-out evaluation and generative probe are passed in by the layers above). Collectives
    # (no-ops on one process) let evaluations spread over torchrun's ranks: latent extraction, ADM's suite.
    "eval": {"models", "nn", "ops", "data", "distributed", "plots", "base"},
    "train": {"models", "nn", "ops", "losses", "data", "distributed", "compile", "plots", "base"},
    # Above train and eval: builds their steps on the meta device and times them (planners, profiler, the study's
    # FLOP counts: train, models, losses, data, eval's Inception network), compiles the kernels (the gate), reads
    # the backends the layers resolved to (ops); what training needs for its own MFU is train's (train.flops).
    "measure": {"train", "eval", "models", "ops", "losses", "data", "compile", "kernels", "plots", "base"},
    # Above both train and eval: the generative probe (trains a DiT, scores it with gFID).
    "downstream": {"train", "models", "nn", "ops", "losses", "data", "distributed", "compile", "eval", "plots",
                   "base"},
    "study": {"downstream", "train", "models", "nn", "ops", "losses", "data", "distributed", "compile", "eval",
              "measure", "plots", "base"},
    "api": {"models", "base"},
    "cli": {"api", "study", "downstream", "train", "models", "nn", "ops", "losses", "data", "distributed", "compile",
            "eval", "measure", "plots", "base"},
}

# (importing module, imported module) -> why it stays for now, and the issue item that removes it.
KNOWN: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    file: str  # relative to the repository root
    line: int
    importer: str  # dotted module
    imported: str  # dotted module (the longest existing prefix of what the statement names)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.importer} [{layer_of(self.importer)}] imports {self.imported} " \
               f"[{layer_of(self.imported)}]"


def source_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under vtp_fast/ and kernels/ (installed as vtp_fast.kernels)."""
    found = {}
    for top, package in (("vtp_fast", "vtp_fast"), ("kernels", "vtp_fast.kernels")):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = source_files()


def layer_of(module: str) -> str | None:
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYER_OF[best] if best is not None else None


def _is_package(module: str) -> bool:
    return module in MODULES and MODULES[module].name == "__init__.py"


def _resolve(importer: str, level: int, module: str | None) -> str:
    """The absolute module a (possibly relative) `from ... import` names."""
    if not level:
        return module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _existing(name: str) -> str:
    """`from vtp_fast import optional` names the submodule vtp_fast.optional; `from vtp_fast.ops.registry import
    new_op` names vtp_fast.ops.registry: the longest prefix that is a module we know (or the name itself)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return name


def imports_of(source: str, importer: str, file: str) -> list[Edge]:
    """Every vtp_fast import in `source`, wherever it is (module level, functions, branches), plus
    importlib.import_module("vtp_fast....") calls with a literal (or f-string) prefix."""
    edges = []
    for node in ast.walk(ast.parse(source, filename=file)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, node.level, node.module)
            names = [f"{base}.{a.name}" if a.name != "*" else base for a in node.names]
        elif isinstance(node, ast.Call) and node.args and getattr(node.func, "attr",
                                                                   getattr(node.func, "id", None)) == "import_module":
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                names = [str(arg.values[0].value).rsplit(".", 1)[0]]  # f"vtp_fast.kernels.{op}" -> vtp_fast.kernels
        for name in names:
            if name == "vtp_fast" or name.startswith("vtp_fast."):
                edges.append(Edge(file, node.lineno, importer, _existing(name)))
    return list(dict.fromkeys(edges))  # one edge per statement and imported module


def all_imports() -> list[Edge]:
    return [e for module, path in MODULES.items()
            for e in imports_of(path.read_text(), module, str(path.relative_to(ROOT)))]


def wrong_way(edges: list[Edge]) -> list[Edge]:
    out = []
    for e in edges:
        src, dst = layer_of(e.importer), layer_of(e.imported)
        if src is None or dst is None or (dst != src and dst not in RANKS[src]):
            out.append(e)
    return out


def package_of(module: str) -> str:
    """vtp_fast.ops.attention -> vtp_fast.ops; vtp_fast.distributed -> vtp_fast.distributed; vtp_fast -> vtp_fast."""
    parts = module.split(".")
    return ".".join(parts[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(graph.get(start, ()))))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


# ---------------------------------------------------------------------------------------------------------- tests


def test_every_module_has_a_layer():
    assert len(MODULES) > 50, f"found only {len(MODULES)} modules under {ROOT}"
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unplaced, f"modules with no layer (add them to LAYER_OF in {__file__}): {unplaced}"
    assert set(LAYER_OF.values()) == set(RANKS), "every layer needs a row in RANKS, and every row a module"
    assert all(allowed <= set(RANKS) for allowed in RANKS.values())


def test_the_rank_table_is_acyclic():
    assert find_cycle({layer: set(allowed) for layer, allowed in RANKS.items()}) is None


def test_no_import_points_the_wrong_way():
    bad = [e for e in wrong_way(all_imports()) if (e.importer, e.imported) not in KNOWN]
    lines = [f"{e}; {layer_of(e.importer)} may import {sorted(RANKS.get(layer_of(e.importer), ()))}" for e in bad]
    assert not bad, "imports that point the wrong way (DESIGN.md, Layout):\n" + "\n".join(lines)


def test_known_violations_are_still_needed():
    found = {(e.importer, e.imported) for e in wrong_way(all_imports())}
    stale = sorted(set(KNOWN) - found)
    assert not stale, f"KNOWN entries no longer needed (remove them from {__file__}): {stale}"


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    example: dict[tuple[str, str], Edge] = {}
    for e in all_imports():
        a, b = package_of(e.importer), package_of(e.imported)
        if a != b and (e.importer, e.imported) not in KNOWN:  # a KNOWN edge is already reported above
            graph.setdefault(a, set()).add(b)
            example.setdefault((a, b), e)
    cycle = find_cycle(graph)
    assert cycle is None, "package import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(
        str(example[a, b]) for a, b in zip(cycle, cycle[1:], strict=False))


# --------------------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(("importer", "source", "imported"), [
    # an import hidden in a function body, as a relative import from a module of a package
    ("vtp_fast.ops.attention", "def f():\n    from ..nn.rope import Rope2D\n", "vtp_fast.nn.rope"),
    # relative import from a package's __init__, naming a submodule
    ("vtp_fast.data", "from . import pairs\nfrom .. import models\n", "vtp_fast.models"),
    # plain import inside a branch
    ("vtp_fast.models.vtp", "if True:\n    import vtp_fast.train.dit\n", "vtp_fast.train.dit"),
    # importlib with an f-string
    ("vtp_fast.losses.clip", "import importlib\nimportlib.import_module(f'vtp_fast.models.{x}')\n", "vtp_fast.models"),
])
def test_the_checker_sees_hidden_wrong_way_imports(importer, source, imported):
    edges = imports_of(source, importer, "<test>")
    assert imported in {e.imported for e in wrong_way(edges)}


def test_the_checker_allows_downward_imports():
    edges = imports_of("from vtp_fast.ops import attention\nfrom vtp_fast import config, optional\n",
                       "vtp_fast.nn.attention", "<test>")
    assert {e.imported for e in edges} == {"vtp_fast.ops.attention", "vtp_fast.config", "vtp_fast.optional"}
    assert wrong_way(edges) == []


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_every_package_is_in_the_distribution():
    """A regular (non-editable) install ships exactly the packages pyproject.toml lists: every package directory
    has to be there, or `pip install .` leaves out its modules."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vtp_fast").rglob("__init__.py")}
    assert on_disk | {"vtp_fast.kernels"} == listed
