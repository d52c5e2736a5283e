"""The package's shape (issue 22): no module at the package root but __init__, no import cycle between modules
(function-local imports included), data_prep builds on modernbert_train and never the reverse, and the
model package imports nothing of ours but itself (plus common's errors and the tokenizer reader)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("modernbert_train", "data_prep")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, at any depth of the file (TYPE_CHECKING blocks included)."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first, but that is the package's own doing: an edge to a
    # package stands for its __init__ module only.
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_at_the_package_root_but_init():
    root = sorted(p.name for p in (REPO / "modernbert_train").glob("*.py"))
    assert root == ["__init__.py"]


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # A package's __init__ re-exporting its own submodules is not a cycle of the design: leave those edges out.
    edges = {name: {t for t in targets if not (name in t and name.count(".") < t.count(".") and
                                                t.startswith(name + "."))}
             for name, targets in graph.items()}
    assert _cycles(edges) == []


def test_data_prep_builds_on_modernbert_train_and_never_the_reverse():
    graph = import_graph()
    reverse = sorted((name, target) for name, targets in graph.items() if name.startswith("modernbert_train")
                     for target in targets if target.startswith("data_prep"))
    assert reverse == []
    assert any(t.startswith("modernbert_train") for n, ts in graph.items() if n.startswith("data_prep") for t in ts)


def test_model_imports_only_itself_errors_and_the_tokenizer_reader():
    graph = import_graph()
    outside = sorted((name, target) for name, targets in graph.items() if name.startswith("modernbert_train.model")
                     for target in targets if not target.startswith(("modernbert_train.model",
                                                                     "modernbert_train.common.errors",
                                                                     # a leaf: tokenizers + errors only
                                                                     "modernbert_train.data.tokenizer")))
    assert outside == []


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
