"""No component grades its own work: nothing that generates, re-ranks or mines reaches the safety judge.

The judge (`models/judge`, `pipeline.safety_models.load_judge` / `JudgeScorer`, used through
`pipeline.judging`) gives the evaluation's headline unsafe rate, so it must never steer what is
generated: if the re-ranker or the miner read it, the audit would measure best-of-k against itself
again. Checked statically, as tests/test_dvc_deps.py finds a command's modules: every project module
that `generate`, `audit`, `chat` and `mine` run (the import closure of their cli.py function) is
scanned for an import of the judge, a use of its names, or the name as a string; and their dvc.yaml
stages must not depend on `models/judge`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from test_dvc_deps import REPO, command_modules

GENERATING_COMMANDS = ("generate", "audit", "chat", "mine")
GENERATING_STAGES = ("generate", "audit", "mine_stage1", "mine_stage2")  # dvc.yaml keys
JUDGE_NAMES = {"load_judge", "JudgeScorer"}  # pipeline.safety_models' judge API
JUDGE_MODULES = {"pipeline.judging", "pipeline.stages.judge"}
DEFINED_IN = "pipeline/safety_models.py"  # where the judge's class lives beside the safety classifier


def judge_uses(tree: ast.AST) -> list[str]:
    """Every place in `tree` that reaches the judge: an import of a judge module or name (`JUDGE`, the
    judge's Task, counts when imported from safety_models), a use of `load_judge` / `JudgeScorer` as a
    name or attribute, or either as a string (a getattr)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name in JUDGE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {alias.name for alias in node.names}
            if node.module in JUDGE_MODULES or {f"{node.module}.{name}" for name in names} & JUDGE_MODULES:
                found.append(f"from {node.module} import {', '.join(sorted(names))}")
            if node.module == "pipeline.safety_models" and names & (JUDGE_NAMES | {"JUDGE"}):
                found.append(f"from pipeline.safety_models import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Name) and node.id in JUDGE_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in JUDGE_NAMES:
            found.append(f".{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in JUDGE_NAMES:
            found.append(repr(node.value))
    return found


def cli_function(command: str) -> ast.FunctionDef:
    tree = ast.parse((REPO / "pipeline" / "cli.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == command:
            return node
    raise AssertionError(f"cli.py has no function {command}")


@pytest.mark.parametrize("command", GENERATING_COMMANDS)
def test_no_module_a_generating_command_runs_reaches_the_judge(command):
    modules = command_modules(command) - {"pipeline/cli.py", DEFINED_IN}
    assert "pipeline/rerank.py" in command_modules("generate")  # the scan sees the re-ranker
    uses = {path: judge_uses(ast.parse((REPO / path).read_text(encoding="utf-8"))) for path in sorted(modules)}
    uses["pipeline/cli.py"] = judge_uses(cli_function(command))
    assert not {path: found for path, found in uses.items() if found}, f"`pipeline {command}` reaches the judge"


def test_the_judge_library_does_not_call_itself_for_the_safety_classifier():
    """safety_models defines JudgeScorer beside SafetyScorer; the classifier the re-ranker loads
    (`load_scorer`, `SafetyScorer`) must not use the judge's class or loader."""
    tree = ast.parse((REPO / DEFINED_IN).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in {"load_scorer", "SafetyScorer",
                                                                               "load_agreement_scorer",
                                                                               "AgreementScorer"}:
            assert not judge_uses(node), node.name


@pytest.mark.parametrize("stage", GENERATING_STAGES)
def test_no_generating_stage_depends_on_the_judge(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    spec = spec.get("do", spec)
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in spec.get("deps", [])]
    assert not [d for d in deps if Path(d).parts[:2] == ("models", "judge")]
    assert "judge" not in spec["cmd"]


def test_the_evaluation_does_read_the_judge():
    """The other side: evaluate and audit_report depend on models/judge and run the judging module."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in ("evaluate", "audit_report"):
        assert "models/judge" in spec[stage]["deps"] and "--judge models/judge" in " ".join(spec[stage]["cmd"].split())
        assert "pipeline/judging.py" in command_modules(stage)


@pytest.mark.parametrize("source, expected", [
    ("from pipeline.safety_models import load_judge\n", ["from pipeline.safety_models import load_judge"]),
    ("from pipeline.safety_models import JUDGE, load_scorer\n",
     ["from pipeline.safety_models import JUDGE, load_scorer"]),
    ("from pipeline import judging\n", ["from pipeline import judging"]),
    ("import pipeline.stages.judge\n", ["import pipeline.stages.judge"]),
    ("def f():\n    from pipeline import safety_models\n    return safety_models.load_judge('models/judge')\n",
     [".load_judge"]),
    ("scorer = getattr(models, 'JudgeScorer')\n", ["'JudgeScorer'"]),
    ("from pipeline.safety_models import load_scorer\nfrom pipeline.human_eval import JUDGE\n", []),
])
def test_the_scan_itself(source, expected):
    assert judge_uses(ast.parse(source)) == expected
