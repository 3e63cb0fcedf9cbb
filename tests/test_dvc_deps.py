"""`dvc.yaml` lists, for every stage, each project module its command runs — so changing any of them
re-runs the stage — and no module it does not run.

The modules a command runs are found statically: the `pipeline/cli.py` function of the command, the
project modules it imports (at the top of cli.py or inside the function), and everything those import,
transitively, wherever the import statement stands (inside functions too: the lazy imports that keep
`--help` fast are still code the stage runs).
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
ENTRY = {"pipeline/__init__.py", "pipeline/__main__.py", "pipeline/stages/__init__.py"}  # empty plumbing


def module_file(name: str) -> str | None:
    """'pipeline.stages.mine' -> 'pipeline/stages/mine.py'; None for a package or a non-project module."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    path = REPO / (name.replace(".", "/") + ".py")
    return str(path.relative_to(REPO)) if path.is_file() else None


def imported_modules(nodes) -> set[str]:
    """Project module files named by the import statements among `nodes` (and inside them)."""
    found = set()
    for tree in nodes:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pipeline.stages import mine` names a module; `from pipeline.config import X` a symbol.
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {path for path in map(module_file, names) if path}
    return found


def closure(start: set[str], scanned: set[str] = frozenset()) -> set[str]:
    """`start` and every project module they import, transitively; `scanned` count as read already."""
    seen, todo = set(scanned), list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imported_modules([ast.parse((REPO / path).read_text(encoding="utf-8"))]) - seen
    return seen - ENTRY


def command_modules(command: str) -> set[str]:
    """Every project module `python -m pipeline <command>` runs."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    functions = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "command":
                    name = decorator.args[0].value if decorator.args else node.name.replace("_", "-")
                    functions[name] = node
    assert command in functions, f"dvc.yaml runs `pipeline {command}`, which cli.py does not define"
    # The callback (`main`) runs before every command.
    callbacks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    # cli.py itself is read here, command by command: its other commands' imports are not this stage's.
    return closure(imported_modules(top_level + callbacks + [functions[command]]), scanned={"pipeline/cli.py"})


def stages() -> dict[str, dict]:
    """Each stage of dvc.yaml (a foreach stage by its template)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: stage.get("do", stage) for name, stage in spec.items()}


def listed_modules(stage: dict) -> set[str]:
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]
    return {d for d in deps if d.startswith("pipeline/") and d.endswith(".py")}


def pipeline_command(cmd: str) -> str:
    words = shlex.split(" ".join(cmd.split()))
    assert words[:3] == ["python", "-m", "pipeline"], f"stage command does not run the pipeline: {cmd}"
    return words[3]


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_runs_is_a_dependency(name):
    stage = stages()[name]
    runs, listed = command_modules(pipeline_command(stage["cmd"])), listed_modules(stage)
    assert not runs - listed, f"dvc.yaml stage {name} misses deps: {sorted(runs - listed)}"
    assert not listed - runs, f"dvc.yaml stage {name} lists modules its command never runs: {sorted(listed - runs)}"


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    """The scan itself: a lazy import inside a function counts, a non-project import does not."""
    tree = ast.parse("import os\ndef f():\n    from pipeline.stages import mine\n    from pipeline.config import MineConfig\n")
    assert imported_modules([tree]) == {"pipeline/stages/mine.py", "pipeline/config.py"}
    assert "pipeline/losses.py" in command_modules("train")
    assert "pipeline/stages/train.py" not in command_modules("download")


def test_every_stage_can_be_restored_from_the_run_cache():
    # DVC saves no run of a stage with a `persist` output in its run cache (dvc/stage/cache.py,
    # `_can_hash`), so such a stage trains again in every experiment, even when only later stages'
    # params changed. The training stages' `--checkpoints` folders are therefore scratch, not outputs.
    for name, stage in stages().items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path, options = (next(iter(out.items())) if isinstance(out, dict) else (out, None))
                assert not (options or {}).get("persist"), f"dvc.yaml stage {name}: {kind} {path} is persist"
        declared = {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}
        words = shlex.split(" ".join(stage["cmd"].split()))
        if "--checkpoints" in words:
            folder = words[words.index("--checkpoints") + 1]
            assert folder not in declared, f"dvc.yaml stage {name}: {folder} is an output that DVC would delete"


def test_a_new_judge_reruns_only_what_reads_its_verdicts():
    """Changing the judge (its `judge` params, its code) reruns the judge stage and what reads models/judge,
    nothing that generates, trains or scores: the experiment is re-evaluated, not re-run."""
    import networkx as nx
    from dvc.repo import Repo

    graph = Repo(str(REPO)).index.graph
    judge = next(stage for stage in graph.nodes if stage.addressing == "judge")
    assert sorted(stage.addressing for stage in nx.ancestors(graph, judge)) == ["audit_report", "evaluate", "ratings"]
    reading = sorted(stage.addressing for stage in graph.nodes
                     if any("judge" in (getattr(dep, "params", None) or []) for dep in stage.deps))
    assert reading == ["judge"]
