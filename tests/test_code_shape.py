"""The code's shape, as promised in README's "Code layout": no import cycle, short functions, and one definition of
the training step, which the trainer, the benchmark and the memory estimate all run."""

import ast
from pathlib import Path

from conftest import ROOT


PACKAGES = ("training", "benchmarks", "tools")
LONGEST_FUNCTION = 100  # lines


def _modules():
    """{module name: parsed file} for the project's own Python modules."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return modules


def _imports(name, tree, known):
    """The project modules `name` imports anywhere in its file (inside functions too: a lazy import still makes a
    circle)."""
    package = name if name in PACKAGES else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level == 1 else (node.module and node.module.split(".")[0])
            module = f"{package}.{node.module}" if node.level == 1 and node.module else (node.module or base)
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def find_cycle(graph):
    """A list of modules forming an import circle, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                return path[path.index(neighbour):] + [neighbour]
            if neighbour not in state:
                cycle = visit(neighbour, path + [neighbour])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_the_project_modules():
    modules = _modules()
    graph = {name: _imports(name, tree, modules) for name, tree in modules.items()}
    assert "training.step" in graph["training.memory_estimate"]  # the reader sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_in_training_is_longer_than_about_100_lines():
    long = []
    for path in sorted((ROOT / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def _calls(path):
    """Names of the functions and methods a file calls."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            function = node.func
            names.add(function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None))
    return names


def test_the_step_is_defined_once_and_run_by_the_trainer_the_benchmark_and_the_estimate():
    """Only training/step.py zeroes gradients (ends an optimizer step); the trainer's loop, the benchmark and the
    memory estimate call its train_step, and the loop and the benchmark run no backward of their own."""
    for user in ("training/core.py", "benchmarks/benchmark_training.py", "training/memory_estimate.py"):
        assert "train_step" in _calls(ROOT / user), f"{user} does not run step.train_step"
    for user in ("training/core.py", "benchmarks/benchmark_training.py"):
        assert "backward" not in _calls(ROOT / user), f"{user} runs a backward pass of its own"
    assert {"zero_grad", "clip_gradients", "backward"} <= _calls(ROOT / "training" / "step.py")
    for path in [*(ROOT / "training").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        if path.name != "step.py":
            assert "zero_grad" not in _calls(path), f"{path.name} ends optimizer steps itself"


# README's "Code layout": "Imports go one way", layer by layer (entry points first, args last).
LAYERS = [
    ["training.cogvideox_text_to_video_lora", "training.cogvideox_text_to_video_sft",
     "training.cogvideox_image_to_video_lora", "training.cogvideox_image_to_video_sft"],
    ["training.core"],
    ["training.settings", "training.backend", "training.data_source", "training.step", "training.validation",
     "training.checkpoint", "training.dry_run", "training.batch_size"],
    ["training.conditioning", "training.modes", "training.models", "training.optim", "training.layouts",
     "training.dataset", "training.buckets"],
    ["training.args"],
]


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for neighbour in graph[todo.pop()] - seen:
            seen.add(neighbour)
            todo.append(neighbour)
    return seen


def test_imports_go_one_way_as_the_readme_says():
    modules = _modules()
    graph = {name: _imports(name, tree, modules) for name, tree in modules.items()}
    assert all(name in graph for layer in LAYERS for name in layer)  # the README names real modules
    for depth, layer in enumerate(LAYERS):
        above = {name for upper in LAYERS[:depth] for name in upper}
        for name in layer:
            assert not _reachable(graph, name) & above, f"{name} imports {sorted(_reachable(graph, name) & above)}"
    # "The memory estimate and the benchmark import step and backend, never core."
    for name in ("training.memory_estimate", "benchmarks.benchmark_training", "benchmarks.estimate_memory"):
        assert "training.step" in _reachable(graph, name) and "training.core" not in _reachable(graph, name), name
