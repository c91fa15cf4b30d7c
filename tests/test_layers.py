"""The package's layers, read from its source: no import cycle among ssl_vit's modules (imports inside
functions counted), no import from a lower layer to a higher one, and imports inside functions only
where they defer something heavy, with the reason beside them.

    config  ->  models, tokenizers, data  ->  tasks  ->  recipes, weights, eval  ->  run  ->  cli

(a module may import its own layer and the layers left of it). The graph is built with `ast` from
every `import` statement, wherever it is written, so an import moved into a function to dodge a cycle
still counts."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ssl_vit"
LAYERS = [["config"], ["models", "tokenizers", "data"], ["tasks"], ["recipes", "weights", "eval"], ["run"], ["cli"]]
MAX_DEFERRED = 10  # imports of our own modules inside functions, each with its reason


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path):
    """(imported module, line, inside a function) for each import of ours in one module."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    functions = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for node in ast.walk(function) if node is not function}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                base = ".".join(parent[:len(parent) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("ssl_vit") and target in known and target != name:
                yield target, node.lineno, id(node) in functions


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name, path)} for name, path in modules().items()}


def find_cycle(edges: dict[str, set[str]]):
    """One cycle of the graph as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else ""
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{name} is in no layer: put it in one of {LAYERS} (tests/test_layers.py)")


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_our_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_ones():
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)}), line {line}"
              for name, path in modules().items() for target, line, _ in imports(name, path)
              if layer(target) > layer(name)]
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_are_few_and_say_why():
    deferred = [(name, path, target, line) for name, path in modules().items()
                for target, line, inside in imports(name, path) if inside]
    assert len(deferred) <= MAX_DEFERRED, "\n".join(f"{n}:{line} imports {t}" for n, _, t, line in deferred)
    for name, path, target, line in deferred:
        text = path.read_text().splitlines()[line - 1]
        assert "#" in text, f"{name}:{line} imports {target} inside a function without saying why"
