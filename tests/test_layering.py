"""The import layers of README "Architecture": every module imports only its own layer or lower
ones, and no import chain comes back to where it started.

    core (errors, device, files, resampling) -> text, models, data -> lora (library/lora and
    kohya's networks/lora.py over it) -> generation -> training -> the two scripts

Every import counts, also the ones inside functions (they run too, only later). The graph is
read from the source with `ast`, so nothing here imports the code it checks.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of each module, by longest matching prefix (a package name covers its modules).
LAYERS = {
    "library": 0, "library.errors": 0, "library.device": 0, "library.safetensors_io": 0,
    "library.file_checks": 0, "library.arg_checks": 0, "library.layers": 0,
    "library.resample": 0, "library.lora_metadata": 0,
    "library.text": 1, "library.models": 1, "library.data": 1, "library.conditioning": 1,
    "library.lora": 2, "networks": 2,
    "library.generation": 3,
    "library.training": 4,
    "sdxl_train_network": 5, "sdxl_gen_img": 5,
}
# Packages that stay importable without MindSpore (their modules run in data workers, or hold
# the checks that run before MindSpore is imported).
MINDSPORE_FREE = ("library.data", "library.text", "library.errors", "library.file_checks",
                  "library.arg_checks", "library.resample", "library.lora_metadata", "library.lora.args",
                  "library.lora.names")


def module_files(root=ROOT):
    files = [*root.glob("library/**/*.py"), *root.glob("networks/*.py"),
             root / "sdxl_train_network.py", root / "sdxl_gen_img.py"]
    modules = {}
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name, path, modules):
    """The modules `name` imports anywhere in its file: `from a.b import c` is an edge to a.b.c
    when that is a module, else to a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return found


def import_graph(root=ROOT):
    modules = module_files(root)
    return {name: {m for m in imports_of(name, path, modules) if m in modules and m != name}
            for name, path in modules.items()}, modules


def layer_of(name):
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    if not prefixes:
        raise AssertionError(f"{name} has no layer: add it to LAYERS (README, Architecture)")
    return LAYERS[max(prefixes, key=len)]


def upward_edges(graph):
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(graph):
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_imports_only_its_layer_or_lower():
    graph, _ = import_graph()
    assert upward_edges(graph) == []


def test_no_import_cycles():
    graph, _ = import_graph()
    assert cycles(graph) == []


def mindspore_importers(root=ROOT):
    """The modules of the MINDSPORE_FREE packages that import MindSpore anywhere."""
    modules = module_files(root)
    return sorted(name for name, path in modules.items()
                  if any(name == p or name.startswith(p + ".") for p in MINDSPORE_FREE)
                  and any(m.split(".")[0] == "mindspore" for m in imports_of(name, path, modules)))


def test_host_modules_do_not_import_mindspore():
    assert mindspore_importers() == []


def planted_copy(tmp_path, relative_path, planted):
    """A copy of the code with `planted` appended to one file; returns its root."""
    copy = tmp_path / "repo"
    for path in module_files().values():
        target = copy / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    victim = copy / relative_path
    victim.write_text(victim.read_text(encoding="utf-8") + "\n" + planted, encoding="utf-8")
    return copy


@pytest.mark.parametrize("planted", [
    "from library.training import loop\n",
    "def f():\n    from library.generation import cli\n",     # inside a function counts too
])
def test_a_planted_upward_import_is_found(tmp_path, planted):
    graph, _ = import_graph(planted_copy(tmp_path, "library/models/config.py", planted))
    assert any(edge.startswith("library.models.config (layer 1) imports") for edge in upward_edges(graph))


def test_a_planted_cycle_is_found(tmp_path):
    graph, _ = import_graph(planted_copy(tmp_path, "library/errors.py", "from library import safetensors_io\n"))
    assert ["library.errors", "library.safetensors_io"] in cycles(graph)


def test_a_planted_mindspore_import_in_the_data_package_is_found(tmp_path):
    root = planted_copy(tmp_path, "library/data/buckets.py", "def f():\n    import mindspore\n")
    assert mindspore_importers(root) == ["library.data.buckets"]
