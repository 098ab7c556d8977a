"""The project's import graph, read from the source (nothing is imported): no cycle anywhere, and no module of the
package imports an entry script. Each run of it walks every import, at module level and inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The user-facing scripts. dataset_module.py is both a script and the data library the training workers import
# (GeneralizedHFDataModule); the package may use it, the other three nobody imports.
ENTRY_SCRIPTS = {"peft_megatron", "test_checkpoint", "convert_checkpoint_to_hf"}
LIBRARY_SCRIPTS = {"dataset_module"}


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the root scripts and every module under the project's packages."""
    modules = {p.stem: p for p in REPO.glob("*.py")}
    for init in REPO.glob("*/__init__.py"):
        for path in init.parent.rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in it (`from package import module` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]  # nemo_finetune.cli.run_cli -> nemo_finetune.cli
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ is imported before any of its modules: that edge is not a cycle of ours.
            if nxt in node.split(".")[:-1]:
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert "nemo_finetune.cli" in graph and "peft_megatron" in graph  # the walk sees the package and the scripts
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_imports_an_entry_script():
    offenders = {
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        for target in targets
        if target in ENTRY_SCRIPTS and not name.startswith(("tests.", "benchmarks.", "examples."))
    }
    assert not offenders, sorted(offenders)


def test_benchmarks_and_examples_take_the_machinery_from_the_package():
    """They may read the training script's `Config`, its docstring and `parse_config` (the settings a job is built
    from, their help and how a command line becomes them, kept where the reader of the pipeline sees them;
    docs/ARCHITECTURE.md) and nothing else of an entry script."""
    modules = project_modules()
    offenders = []
    for path in sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("examples/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target in imports_of(path, path.stem, modules) & ENTRY_SCRIPTS - {"peft_megatron"}:
            offenders.append(f"{path.relative_to(REPO)} imports {target}")
        names = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name == "peft_megatron"
        }
        used = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names
        }
        used |= {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "peft_megatron"
            for alias in node.names
        }
        offenders += [
            f"{path.relative_to(REPO)} uses peft_megatron.{name}"
            for name in sorted(used - {"Config", "__doc__", "parse_config"})
        ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set(), "pkg.x": {"pkg"}, "pkg": {"pkg.x"}}, None),  # a package importing its module
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_cycles_and_only_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_walk_resolves_relative_and_from_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .c import thing\n\ndef f():\n    import top\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg, "pkg.c": pkg, "top": tmp_path}
    assert imports_of(pkg / "a.py", "pkg.a", modules) == {"pkg", "pkg.b", "pkg.c", "top"}
