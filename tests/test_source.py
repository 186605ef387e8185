"""The shape of src/memfit: its modules import one another in one direction
(no cycle, counting the imports inside functions too), and no function is
over 60 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "memfit"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("memfit", *parts)).removesuffix(".__init__")


def imports() -> dict:
    """module -> the memfit modules it imports (a name imported from a package that is
    one of its submodules counts as that submodule)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memfit"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = {d for d in deps if d != name and not (name == "memfit" or d == "memfit")}
    return graph


def find_cycle(graph):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycle_in_src_memfit():
    assert find_cycle(imports()) is None, " -> ".join(find_cycle(imports()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def code_lines(node) -> int:
    """The lines of a function from its `def` to its end, its docstring left out (the public API's `Args:`
    docstrings are as long as they need to be)."""
    body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
    docstring = (body[0].lineno - node.body[0].lineno) if body is not node.body else 0
    return node.end_lineno - node.lineno + 1 - docstring


def test_no_function_in_src_memfit_is_over_60_lines():
    long = [
        f"{p.relative_to(ROOT)}:{node.name} ({code_lines(node)} lines)"
        for p in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node) > 60
    ]
    assert not long, long


def test_init_rebinds_no_submodule_name():
    """`memfit.X` is the module memfit/X.py or a name of its own, never both."""
    import importlib

    import memfit

    names = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" and p.stem not in ("__init__", "__main__")}
    names |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    shadowed = []
    for name in sorted(names):
        module = importlib.import_module(f"memfit.{name}")
        if getattr(memfit, name) is not module:
            shadowed.append(name)
    assert not shadowed, f"memfit/__init__.py rebinds the submodule names {shadowed}"


def test_library_errors_name_arguments_not_cli_flags():
    """Only the CLI speaks of its flags; a command quoted whole (`memfit plan --json PATH`) may stand in a hint."""
    import re

    found = []
    for p in ROOT.rglob("*.py"):
        if p.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MemfitError":
                text = "".join(
                    c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
                if re.search(r"(?<![\w-])--[a-z]", re.sub(r"`memfit [^`]*`", "", text)):
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno}: {text[:80]}")
    assert not found, found


def public_names() -> dict:
    """name -> the modules of src/memfit that define it at top level (functions, classes, constants)."""
    where: dict = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if not name.startswith("_"):
                    where.setdefault(name, set()).add(module_name(path))
    return where


# One interface, implemented once per module: each built-in model module has `build`, `batch`, `loss_fn`,
# `SIZES` (memfit.models loads them by name) and its own classes; each trainer's module a `MemfitCallback`.
# `aten` is torch.ops.aten wherever it is named.
SHARED = {"MemfitCallback", "aten"}


def _interface(name: str, modules: set) -> bool:
    return name in SHARED or all(m.startswith("memfit.models.") for m in modules)


def test_a_public_name_means_one_thing_in_src_memfit():
    """No two modules define the same public name (`apply` meant two functions, `parse` two parsers, `UNIFORM` a
    dict and a tuple): a name found in one file means the same in every other, but for one interface that
    several modules implement (`SHARED`)."""
    twice = {
        name: sorted(mods) for name, mods in public_names().items() if len(mods) > 1 and not _interface(name, mods)
    }
    assert not twice, twice


LAYERS = ["memfit.core", "memfit.planning", "memfit.tools"]  # each may import the ones before it, none after


def layer(module: str) -> int:
    """The layer of a memfit module: core 0, planning 1, tools 2; 3 for the rest (the command line, the
    applications: train, attribution, integrations, models), which sit on top; -1 for memfit.errors, under all."""
    if module == "memfit.errors":
        return -1
    return next(
        (k for k, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")), len(LAYERS)
    )


def test_the_folders_import_downwards():
    """The folders draw the architecture: `core` (what memfit does to a step, and the instruments that measure
    one) imports nothing of `planning`, which imports nothing of `tools` (verify, bench, report), which imports
    nothing of the applications above them."""
    upward = sorted(
        f"{m} imports {d}" for m, deps in imports().items() for d in deps if m != "memfit" and layer(d) > layer(m)
    )
    assert not upward, upward
