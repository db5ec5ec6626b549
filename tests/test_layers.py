"""The package's import graph, read from the source with `ast`: no module imports itself through others (no
import loop), and none imports a module of a higher layer (the tools import the core, never the reverse).
Imports inside functions count: a deferred import is still a dependency. A new module must be given a layer."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minifastv"

# Lowest first. A module belongs to the layer of the longest name that it is or lies under (the package itself,
# its __init__, only by its own name); it may import its own layer (without a loop) and the layers below.
LAYERS = [
    ["minifastv.config", "minifastv.config_checks", "minifastv.config_clip", "minifastv.machine", "minifastv.files",
     "minifastv.data"],
    ["minifastv.image", "minifastv.anyres", "minifastv.video", "minifastv.tokenizer", "minifastv.tiktoken_bpe",
     "minifastv.inputs"],
    ["minifastv.pruning", "minifastv.quant"],
    ["minifastv.models"],
    ["minifastv.checkpoint", "minifastv.convert", "minifastv.convert_qwen", "minifastv.convert_clip"],
    ["minifastv.pipeline", "minifastv.batch"],
    ["minifastv.options", "minifastv.plot", "minifastv.analyze", "minifastv.serve", "minifastv.eval",
     "minifastv.bench", "minifastv.cli"],
    ["minifastv", "minifastv.__main__"],
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (an imported name that is a submodule counts as that module)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node], _ = "open", stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = "done", stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def layer_of(name: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if name == prefix or (name.startswith(prefix + ".") and "." in prefix)]
    if not matches:
        raise AssertionError(f"{name} has no layer: add it to LAYERS in {Path(__file__).name}")
    return max(matches)[1]


def upward(graph: dict[str, set[str]]) -> list[str]:
    for name in graph:  # every module has a place, imported or not
        layer_of(name)
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, edges in graph.items() for b in edges if layer_of(b) > layer_of(a))


def test_the_package_has_no_import_loop():
    assert cycle(import_graph(PACKAGE)) is None, " -> ".join(cycle(import_graph(PACKAGE)))


def test_no_module_imports_a_higher_layer():
    assert upward(import_graph(PACKAGE)) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, loop", [
    ({"__init__.py": "", "a.py": "from .b import x\n", "b.py": "def f():\n    from .a import y\n"},
     ["minifastv.a", "minifastv.b", "minifastv.a"]),                                 # deferred import
    ({"__init__.py": "", "p/__init__.py": "", "p/a.py": "from . import b\n", "p/b.py": "import minifastv.p.a\n"},
     ["minifastv.p.a", "minifastv.p.b", "minifastv.p.a"]),                             # a submodule by name
    ({"__init__.py": "", "p/__init__.py": "from .a import x\n", "p/a.py": "from ..q import y\n",
      "q.py": "from .p import z\n"}, ["minifastv.p", "minifastv.p.a", "minifastv.q", "minifastv.p"]),
])
def test_the_checker_finds_loops(tmp_path, files, loop):
    assert cycle(import_graph(write(tmp_path / "minifastv", files))) == loop


def test_the_checker_finds_upward_imports_and_unplaced_modules(tmp_path):
    root = write(tmp_path / "minifastv", {"__init__.py": "", "config.py": "def f():\n    from .cli import main\n",
                                          "cli.py": "from .config import f\n"})
    assert upward(import_graph(root)) == ["minifastv.config (layer 0) imports minifastv.cli (layer 6)"]
    write(root, {"elsewhere.py": ""})
    with pytest.raises(AssertionError, match="minifastv.elsewhere has no layer"):
        upward(import_graph(root))


ROOT = PACKAGE.parent


def test_the_readmes_reading_path_is_counted_right_and_stays_small():
    """The Architecture table's line counts are the files' own, and a learner's path stays within 1,100 lines."""
    import re

    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(minifastv/[\w/]+\.py)` \| (\d+) \|", readme, re.M)
    counted = {path: int(n) for path, n in rows}
    assert {"minifastv/config.py", "minifastv/models/llama.py", "minifastv/models/clip.py", "minifastv/models/llava.py",
            "minifastv/models/cache.py", "minifastv/models/generate.py", "minifastv/pruning/base.py",
            "minifastv/pruning/fastv.py"} <= set(counted)
    assert counted == {path: len((ROOT / path).read_text().splitlines()) for path in counted}
    total = int(re.search(r"^\| total \| (\d+) \|", readme, re.M).group(1))
    assert total == sum(counted.values()) <= 1100


def test_the_decoder_loop_reads_in_one_screen():
    import inspect

    from minifastv.models.llama import Llama

    assert len(inspect.getsource(Llama.forward).splitlines()) <= 30


def test_the_readme_is_a_front_door():
    """At most 300 lines of at most 120 characters; the pages it points to exist, five of them at least."""
    import re

    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 300 and [n for n, line in enumerate(lines, 1) if len(line) > 120] == []
    pages = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    assert len(pages) >= 5 and all((ROOT / page).is_file() for page in pages)
    for page in (ROOT / "docs").glob("*.md"):  # the pages' own links between them
        assert all((page.parent / link).is_file() for link in re.findall(r"\]\(([\w-]+\.md)\)", page.read_text()))
