"""`dvc repro` of the `download` and `normalize` stages in a temporary copy of the repository, and what
`dvc status` says after a parameter or a sample file changes: only the stages that read it."""

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import CORPORA

pytestmark = pytest.mark.slow

TARGETS = ["download", "normalize"]  # foreach stages: each name expands to all its @items


COMMITTED_DATA = ("data/sample/", "data/ratings/")  # data/ folders that are inputs, not pipeline outputs


def repo_files(repo_root: Path) -> list[str]:
    """Tracked and not-ignored files, without pipeline outputs or a dvc.lock from earlier runs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return [f for f in listed if f and (repo_root / f).is_file() and f != "dvc.lock"
            and not (f.startswith("data/") and not f.startswith(COMMITTED_DATA))]


@pytest.fixture(scope="module")
def dvc_copy(repo_root, tmp_path_factory):
    """A git-initialised copy of the repository and a `run(*args)` for commands in it."""
    venv_bin = repo_root / ".venv" / "bin"
    if not (venv_bin / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs .venv/bin/dvc and git")
    copy = tmp_path_factory.mktemp("repo")
    archive = copy.parent / f"{copy.name}.tar"
    with tarfile.open(archive, "w") as tar:
        for name in repo_files(repo_root):
            tar.add(repo_root / name, arcname=name)
    with tarfile.open(archive) as tar:
        tar.extractall(copy, filter="data")
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}

    def run(*args) -> str:
        result = subprocess.run(list(args), cwd=copy, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        return result.stdout

    run("git", "init", "-q")
    return copy, run


def ran_stages(output: str) -> list[str]:
    return sorted(line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '"))


def changed_stages(run) -> list[str]:
    return sorted(json.loads(run("dvc", "status", "--json", *TARGETS) or "{}"))


def test_repro_then_only_affected_stages_change(dvc_copy):
    copy, run = dvc_copy
    all_stages = sorted(f"{stage}@{corpus}" for stage in TARGETS for corpus in CORPORA)

    assert ran_stages(run("dvc", "repro", *TARGETS)) == all_stages
    for corpus in CORPORA:
        for split in ("train", "validation", "test"):
            assert (copy / "data" / "normalized" / corpus / f"{split}.parquet").is_file()
        assert json.loads((copy / "data" / "normalized" / corpus / "stats.json").read_text())["source"] == "sample"
    assert changed_stages(run) == []
    assert ran_stages(run("dvc", "repro", *TARGETS)) == []  # nothing to do

    # A normalize parameter touches only the normalize stages.
    params_path = copy / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["normalize"]["max_chars"] += 1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed_stages(run) == sorted(f"normalize@{corpus}" for corpus in CORPORA)
    params_path.write_text(original)
    assert changed_stages(run) == []

    # One corpus's sample file touches only that corpus's stages.
    sample = copy / "data" / "sample" / "mic" / "test.jsonl"
    lines = sample.read_text(encoding="utf-8").splitlines(keepends=True)
    sample.write_text("".join(lines[:-1]), encoding="utf-8")
    assert changed_stages(run) == ["download@mic"]  # normalize@mic follows once raw/mic has changed
    assert ran_stages(run("dvc", "repro", *TARGETS)) == ["download@mic", "normalize@mic"]
    assert changed_stages(run) == []
    stats = json.loads((copy / "data" / "raw" / "mic" / "stats.json").read_text())
    assert stats["files"]["test"]["rows"] == len([line for line in lines[:-1] if line.strip()])
