"""Imports go down only: walk every module of ``src/jaxmint`` with ``ast``.

The layers are those of docs/architecture.md. A module may import its own layer
and the layers below; never a higher one, and the packages never form a cycle.
A function-level import is kept only for a slow optional dependency, named in
``LAZY_OK``; a function-level import of jaxmint itself is always an error.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "jaxmint"

LAYERS = {
    **dict.fromkeys(
        [
            "models",
            "losses",
            "data",
            "track",
            "config",
            "state",
            "steps",
            "metrics",
            "_tree",
            "_extras",
        ],
        0,
    ),
    "checkpoint": 1,
    "run": 2,
    "train": 3,
    **dict.fromkeys(["diagnose", "debug", "export", "sweep"], 4),
    **dict.fromkeys(["experiment", "cli"], 5),
}

# Slow or optional third-party imports that may wait until a function needs them.
LAZY_OK = {
    "optuna",
    "sqlalchemy",  # optuna's database layer (the sweep extra), for its error types
    "submitit",
    "ray",
    "matplotlib",
    "onnx",
    "jax2onnx",
    "onnxruntime",
    "iree",
    "tensorboardX",
    "sklearn",
    "grain",  # the data extra: file-backed sources read through Grain
    "array_record",
    "pyarrow",
}


def _package(module: str) -> str | None:
    """``jaxmint.losses._algebra`` -> ``losses``; the facade ``jaxmint`` -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "jaxmint" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.Module):
    """``(target module, line, at function level)`` for every import in ``tree``."""
    functions = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            functions.update(id(n) for n in ast.walk(node) if n is not node)
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue  # annotations only: never executed
        lazy = id(node) in functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, lazy
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jaxmint":  # from jaxmint import losses: the subpackage
                for alias in node.names:
                    yield f"jaxmint.{alias.name}", node.lineno, lazy
            else:
                yield node.module, node.lineno, lazy


def _walk():
    edges, problems = {}, []
    for path in sorted(SRC.rglob("*.py")):
        source = _package(_module_name(path))
        if source is None:
            continue  # the facade re-exports every layer
        for target, line, lazy in _imports(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(SRC.parent)}:{line}"
            dest = _package(target)
            if lazy and target.split(".")[0] == "jaxmint":
                problems.append(f"{where}: function-level import of {target}")
            elif lazy and target.split(".")[0] not in LAZY_OK:
                problems.append(f"{where}: function-level import of {target} (not a slow extra)")
            if dest is None or dest == source:
                continue
            if LAYERS[dest] > LAYERS[source]:
                problems.append(f"{where}: {source} (layer {LAYERS[source]}) imports up: {target}")
            edges.setdefault(source, set()).add(dest)
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in SRC.rglob("*.py")} - {None}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_imports_go_down_only():
    _, problems = _walk()
    assert not problems, "\n".join(problems)


def test_packages_form_no_cycle():
    edges, _ = _walk()
    cycles = _cycles(edges)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


RUN_DIR_NAMES = {
    "config.json",
    "metrics.jsonl",
    "tb",
    "checkpoints",
    "checkpoints.damaged",
    "DEBUG_RUN",
    "nonfinite.json",
    "diagnosis",
}


def test_only_the_run_package_spells_the_run_dirs_files():
    spelled = []
    for path in sorted(SRC.rglob("*.py")):
        if _package(_module_name(path)) == "run":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and node.value in RUN_DIR_NAMES:
                spelled.append(f"{path.relative_to(SRC)}:{node.lineno} spells {node.value!r}")
    assert not spelled, "ask jaxmint.run.RunDir instead:\n" + "\n".join(spelled)


def test_metrics_read_back_through_the_run_dir(tmp_path):
    from jaxmint.run import RunDir
    from jaxmint.track import JsonlWriter, read_metrics

    run = RunDir(tmp_path)
    writer = JsonlWriter(run.metrics_file)
    writer.write({"step": 1, "loss": float("nan")})
    writer.close()
    records = run.metrics()
    assert records[0]["step"] == 1 and records[0]["loss"] != records[0]["loss"]
    assert [r["step"] for r in read_metrics(run.metrics_file)] == [1]
    with pytest.raises(IsADirectoryError, match=r"RunDir\("):
        read_metrics(tmp_path)
