"""The kill hook (`pipeline/faults.py`) and what an interrupted write leaves behind: a SIGKILL at a
write or in the middle of a folder swap keeps the earlier files whole, and the next write removes the
leftovers. (`test_reliability.py` uses the hook on every stage under `dvc repro`.)"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import faults
from pipeline.artifacts import staged_dir, write_json
from pipeline.errors import ConfigError


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_script(code: str, cwd, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter and session (the hook kills its whole process group)."""
    full_env = {name: value for name, value in os.environ.items() if name not in (faults.ENV, "DVC_STAGE")}
    full_env.update(PYTHONPATH=str(REPO_ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60, start_new_session=True)


@pytest.mark.parametrize("spec, parsed", [
    ("train_stage1:checkpoint", ("train_stage1", "checkpoint", 1)),
    ("normalize@mic:write:3", ("normalize@mic", "write", 3)),
    ("*:swap", ("*", "swap", 1)),
])
def test_a_spec_is_parsed(spec, parsed):
    assert faults.parse(spec) == parsed


@pytest.mark.parametrize("spec", ["train_stage1", "train_stage1:save", "x:write:0", "x:write:two", ":write",
                                  "a:write:1:2"])
def test_a_malformed_spec_is_named(spec):
    with pytest.raises(ConfigError, match="PIPELINE_TEST_KILL_AT"):
        faults.parse(spec)


def test_nothing_happens_when_unset_or_for_another_stage_or_point(monkeypatch):
    # In this very process: a wrong match would kill pytest itself, so this test cannot pass by accident.
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.kill_point("write")  # unset: a no-op
    monkeypatch.setenv(faults.ENV, "safety:write")
    monkeypatch.setenv("DVC_STAGE", "mine_stage1")
    faults.kill_point("write")  # another stage
    monkeypatch.setenv("DVC_STAGE", "safety")
    faults.kill_point("checkpoint")  # another point
    faults.kill_point("swap")
    assert faults._hits["checkpoint"] == 0  # counted only for the named stage and point


def test_the_nth_write_kills_the_process_group_and_earlier_files_are_whole(tmp_path):
    result = run_script("""
        from pipeline.artifacts import write_json
        for name in ("a", "b", "c"):
            write_json({"name": name, "payload": list(range(1000))}, f"{name}.json")
        print("not reached")
    """, tmp_path, PIPELINE_TEST_KILL_AT="mine_stage1:write:2", DVC_STAGE="mine_stage1")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "PIPELINE_TEST_KILL_AT: killing mine_stage1 at write #2" in result.stderr
    assert "not reached" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # b renamed into place, c never begun
    assert (tmp_path / "b.json").read_text().startswith('{\n  "name": "b"')


def test_a_kill_in_the_middle_of_a_swap_is_repaired_by_the_next_write(tmp_path):
    code = """
        from pipeline.artifacts import staged_dir, write_json
        with staged_dir("out") as folder:
            write_json({"version": VERSION}, folder / "stats.json")
    """
    assert run_script(code.replace("VERSION", "1"), tmp_path).returncode == 0
    killed = run_script(code.replace("VERSION", "2"), tmp_path, PIPELINE_TEST_KILL_AT="*:swap")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Killed between the two renames: the old folder is aside, the new one is still temporary.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "out" not in names and ".out.old" in names
    assert len([n for n in names if n.startswith(".out.") and n.endswith(".tmp")]) == 1

    assert run_script(code.replace("VERSION", "3"), tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "stats.json").read_text() == '{\n  "version": 3\n}\n'


def test_leftovers_of_a_killed_write_are_removed_but_nothing_else(tmp_path):
    (tmp_path / ".stats.json.abcd1234.tmp").write_text("half")  # an atomic_path temp of stats.json
    (tmp_path / ".out.x1y2z3_4.tmp").mkdir()  # a staged_dir temp of out
    (tmp_path / ".out.old").mkdir()
    keep = [".stats.json.notmine.tmp", ".out.json.abcd1234.tmp", ".output.abcd1234.tmp", "notes.txt"]
    for name in keep:
        (tmp_path / name).write_text("not a leftover of stats.json or out")

    write_json({}, tmp_path / "stats.json")
    with staged_dir(tmp_path / "out") as folder:
        (folder / "x").write_text("x")

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["out", "stats.json"])
