"""The layering docs/architecture.md promises, checked on the source: one rollout, no private imports across
modules, short functions, the method apart from files and progress bars."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"timetuner": ROOT / "timetuner", "timetuner.trainers": ROOT / "trainers", "timetuner.cli": ROOT / "cli"}
MAX_FUNCTION_LINES = 60


def modules(*packages: str):
    for package in packages:
        for path in sorted(PACKAGES[package].rglob("*.py")):
            parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
            if package == "timetuner" and parts[0] in ("trainers", "cli"):  # not there, but never twice
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            yield ".".join((package, *parts)), path, ast.parse(path.read_text())


def layer(module: str) -> str:
    """The layer of a timetuner module: artifact ← core ← {fitting, measuring}; trainers and cli above."""
    for name in ("core", "fitting", "measuring", "trainers", "cli"):
        if module == f"timetuner.{name}" or module.startswith(f"timetuner.{name}."):
            return name
    return "artifact"  # the table, the scheduler, errors, files, assets


# Which layers each may import. The facade `timetuner/__init__.py` is the one lazy boundary and is left out.
MAY_IMPORT = {"artifact": {"artifact"}, "core": {"artifact", "core"}, "measuring": {"artifact", "core", "measuring"},
              "fitting": {"artifact", "core", "fitting"}, "trainers": {"artifact", "core", "measuring", "trainers"},
              "cli": {"artifact", "core", "fitting", "measuring", "trainers", "cli"}}
# fitting uses measuring only for the held-out verdict: its protocol, yardstick, held-out samples and rule.
VERDICT = {"timetuner.measuring.yardstick", "timetuner.measuring.evaluation", "timetuner.measuring.verdict",
           "timetuner.measuring.heldout"}


def imports() -> dict[str, set[str]]:
    """module → the timetuner modules it imports, at module level or inside functions."""
    known = {name for name, _, _ in modules(*PACKAGES)}
    graph = {}
    for name, _, tree in modules(*PACKAGES):
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timetuner"):
                for alias in node.names:  # `from package import module` names a module
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in known else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("timetuner")}
        graph[name] = {t for t in targets if t != name and t != "timetuner"}
    return graph


def test_layers_import_only_downwards():
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in imports().items() if m != "timetuner"
             for t in sorted(targets) if layer(t) not in MAY_IMPORT[layer(m)]
             and not (layer(m) == "fitting" and t in VERDICT)]
    assert wrong == []


def test_no_import_circles():
    graph, circles = imports(), []
    graph.pop("timetuner", None)

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert circles == []


def test_every_module_stays_under_400_lines():
    long = [f"{name}: {len(path.read_text().splitlines())}" for name, path, _ in modules(*PACKAGES)
            if len(path.read_text().splitlines()) >= 400]
    assert long == []


def test_no_private_name_is_imported_across_modules():
    crossings = []
    for name, _, tree in modules(*PACKAGES):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timetuner"):
                crossings += [f"{name} imports {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__") and node.module != name]
    assert crossings == []


def test_one_rollout_loop_over_scheduler_timesteps():
    # Fitting, evaluation, sampling, references and the trainers' grids all run `timetuner.core.solver.Solver`.
    loops = []
    for name, _, tree in modules(*PACKAGES):
        for node in ast.walk(tree):
            if isinstance(node, ast.For) and "timesteps" in ast.unparse(node.iter):
                loops.append(f"{name}:{node.lineno}")
    assert loops == []
    solver = (ROOT / "timetuner" / "core" / "solver.py").read_text()
    assert "for k in range(self.evaluations)" in solver


@pytest.mark.parametrize("package", ["timetuner", "timetuner.trainers"])
def test_functions_stay_short(package):
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, _, tree in modules(package) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_method_module_holds_no_file_io_progress_or_loading():
    source = (ROOT / "timetuner" / "fitting" / "method.py").read_text()
    assert len(source.splitlines()) < 300
    tree = ast.parse(source)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert imported <= {"__future__", "copy", "math", "time", "dataclasses", "torch", "timetuner.core.solver",
                        "timetuner.fitting.search", "timetuner.core.distributed", "timetuner.core.distance",
                        "timetuner.fitting.grid", "timetuner.fitting.joint"}
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not {c for c in calls if c in {"open", "print"} or c.endswith(("write_text", "save", "tqdm"))}


def test_the_library_never_imports_the_cli():
    users = [name for name, _, tree in modules("timetuner", "timetuner.trainers") for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timetuner.cli")]
    assert users == []


def test_nothing_is_unpickled_and_no_code_runs_from_a_model_folder():
    # torch.load only with weights_only=True, np.load never with pickles, no trust_remote_code / custom pipelines,
    # and no accelerate custom-object checkpoints (accelerate unpickles those with weights_only=False).
    offending = []
    for name, _, tree in modules(*PACKAGES):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, keywords = ast.unparse(node.func), {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.load") and keywords.get("weights_only") != "True":
                offending.append((name, func))
            if func.endswith(("np.load", "numpy.load")) and keywords.get("allow_pickle") != "False":
                offending.append((name, func))
            if keywords.get("trust_remote_code") not in (None, "False") or "custom_pipeline" in keywords:
                offending.append((name, func))
            if func.endswith(("register_for_checkpointing", "pickle.load", "pickle.loads")):
                offending.append((name, func))
    assert offending == []


def test_no_model_family_is_named_outside_its_own_module():
    """A family is one module under core/families/: no other module tests for one by name (docs/architecture.md)."""
    from timetuner.core.families import FAMILIES, Family

    names, todo = set(), list(Family.__subclasses__())
    while todo:
        family = todo.pop()
        todo += family.__subclasses__()
        names.add(family.__name__)
    assert len(set(FAMILIES.values())) >= 7 and len(names) >= 8 and "TextSDXL" in names
    outside = [f"{name} names {used}" for name, path, tree in modules(*PACKAGES)
               if not name.startswith("timetuner.core.families") for node in ast.walk(tree)
               if isinstance(node, ast.Name | ast.alias | ast.Attribute)
               for used in [getattr(node, "id", None) or getattr(node, "name", None) or getattr(node, "attr", None)]
               if used in names]
    assert outside == []


PUBLIC = ("timetuner", "timetuner.core", "timetuner.fitting", "timetuner.measuring", "timetuner.trainers",
          "timetuner.assets", "timetuner.tiny")


def test_bench_uses_only_the_public_api():
    """bench/ is a user of the library: it imports the names the packages export (`__all__`), nothing from the
    tests, no private module, and sets no import path of its own."""
    import importlib

    wrong = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("timetuner", "tests")):
                if node.module not in PUBLIC:
                    wrong.append(f"{path.name} imports from {node.module}")
                    continue
                exported = getattr(importlib.import_module(node.module), "__all__", None)
                wrong += [f"{path.name} imports {node.module}.{a.name}" for a in node.names
                          if exported is not None and a.name not in exported]
            elif isinstance(node, ast.Import):
                wrong += [f"{path.name} imports {a.name}" for a in node.names
                          if a.name.startswith(("timetuner.", "tests")) or a.name.startswith("test_")]
            elif isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.path":
                wrong.append(f"{path.name} changes sys.path")
    assert wrong == []


@pytest.mark.parametrize("package", ["timetuner", "timetuner.core", "timetuner.fitting", "timetuner.measuring",
                                     "timetuner.trainers"])
def test_every_exported_name_resolves(package):
    import importlib

    module = importlib.import_module(package)
    assert module.__all__ and all(getattr(module, name) is not None for name in module.__all__)
