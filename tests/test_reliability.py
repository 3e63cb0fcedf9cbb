"""Reliability of the whole pipeline under `dvc repro`, in a temporary copy of the repository.

Interruptions: the default configuration is built from scratch by a sequence of `dvc repro` runs, each
killed with SIGKILL (its process group, `dvc repro` included, as a power cut would) in the middle of
one more stage by the `PIPELINE_TEST_KILL_AT` hook (`pipeline/faults.py`), until a last plain `dvc
repro` finishes. Each next run starts with the killed stage, which finishes this time (training resumes
from its checkpoint). Since that stage never completed before, DVC has nothing of it to restore: the
rerun is real.

Determinism and "the same as without the kill": `dvc repro --force` then rebuilds everything without
interruption, and dvc.lock and every output file (Parquet, JSON, weights, plots, reports) must be
byte-identical to the interrupted build; `reports/metrics.json` and the candidate files are also
compared explicitly. Afterwards `dvc status` is clean, no temporary file or folder is left in the
workspace and none is in DVC's cache.

The whole module takes about two builds of the pipeline (some 15-25 minutes on 2 cores). Marked
slow: `make test-slow` (and `.ci/run`) runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline.config import CORPORA, GENERATE_MODELS
from test_dvc_pipeline import ran_stages, repo_files

# The module fixture's build (charged to the first test) and the forced rebuild take minutes each.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

OUTPUT_ROOTS = ("data/raw", "data/normalized", "data/groups", "data/candidates", "models", "reports")
LEFTOVER = re.compile(r"^\..+\.([a-z0-9_]{8}\.tmp|old)$")  # what artifacts.atomic_path / staged_dir leave
TIMEOUT = 1200


class Workspace:
    """A committed copy of the repository with `run(*args)` for commands in it (the project's venv first
    on PATH, the copy's own `pipeline` package importable)."""

    def __init__(self, root: Path, venv_bin: Path):
        self.root = root
        self.env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root)}
        self.env.pop("PIPELINE_TEST_KILL_AT", None)

    def run(self, *args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        # A session of its own, so that the kill hook's SIGKILL of the process group spares pytest.
        result = subprocess.run(list(args), cwd=self.root, env={**self.env, **(env or {})}, capture_output=True,
                                text=True, timeout=TIMEOUT, start_new_session=True)
        if check:
            assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def status(self) -> dict:
        return json.loads(self.run("dvc", "status", "--json").stdout or "{}")

    def lock(self) -> str:
        return (self.root / "dvc.lock").read_text()

    def outputs(self) -> dict[str, str]:
        """SHA-256 of every file under the pipeline's output folders."""
        found = {}
        for top in OUTPUT_ROOTS:
            for path in sorted((self.root / top).rglob("*")):
                if path.is_file() and path.name != ".gitignore":
                    found[str(path.relative_to(self.root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return found

    def leftovers(self) -> list[str]:
        """Temporary files and folders of interrupted writes, anywhere outside .git and .dvc."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob(".*")
                      if LEFTOVER.match(p.name) and not p.relative_to(self.root).parts[0] in (".git", ".dvc"))

    def cached_leftovers(self) -> list[str]:
        """Entries of cached folders (the cache's .dir manifests) that are temporary files."""
        bad = []
        for manifest in (self.root / ".dvc" / "cache").rglob("*.dir"):
            for entry in json.loads(manifest.read_text()):
                if any(LEFTOVER.match(part) for part in Path(entry["relpath"]).parts):
                    bad.append(entry["relpath"])
        return bad


# (stage, kill point) in the order `dvc repro` runs the stages: the n-th file written (default the
# first), mostly inside a staged folder, or a training checkpoint. (The `swap` point is tested in
# test_faults.py: DVC deletes a stage's outputs before it runs, so under `dvc repro` there is no old
# folder to move aside.)
KILLS = [
    ("download@daily_dialog", "write"),  # one split file written, the others not
    ("normalize@mic", "write:4"),  # its staged folder complete (stats.json last), not yet renamed
    ("normalize@daily_dialog", "write"),
    ("base_model", "write"),  # the weights and tokenizer written, base_model.json just renamed in
    ("safety", "write"),  # tfidf.npz written, scorer.json not
    ("rot_agreement", "write"),
    ("mine_stage1", "write"),  # train.parquet written, validation and test not
    ("train_stage1", "checkpoint"),  # after epoch 1 of 2: the rerun resumes
    ("mine_stage2", "write:2"),
    ("train_stage2", "checkpoint"),  # its one epoch done, the model not yet written: the rerun resumes
    ("generate@stage2", "write:3"),  # three of the corpora written
    ("score@stage1", "write"),
    ("evaluate", "write"),  # metrics.json written, results.json and the rest not
]


@pytest.fixture(scope="module")
def workspace(repo_root, tmp_path_factory):
    """The copy after the interrupted build: `runs[i]` is what the run killed at KILLS[i] reported (the
    last run, not killed, finishes the build); `interrupted` holds dvc.lock and the output checksums."""
    venv_bin = repo_root / ".venv" / "bin"
    if not (venv_bin / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs .venv/bin/dvc and git")
    root = tmp_path_factory.mktemp("reliability")
    archive = root.parent / f"{root.name}.tar"
    with tarfile.open(archive, "w") as tar:
        for name in repo_files(repo_root):
            tar.add(repo_root / name, arcname=name)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    ws = Workspace(root, venv_bin)
    # A first commit: dvclive (training) needs one, and provenance records it.
    ws.run("git", "init", "-q")
    ws.run("git", "add", "-A")
    ws.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "copy")

    # runs[i]: the run killed at KILLS[i] (which also reran KILLS[i - 1]); the last one finishes.
    ws.runs = []
    for stage, point in [*KILLS, (None, None)]:
        env = {"PIPELINE_TEST_KILL_AT": f"{stage}:{point}"} if stage else {}
        result = ws.run("dvc", "repro", env=env, check=False)
        ws.runs.append({"result": result, "ran": ran_stages_in_order(result.stdout), "status": ws.status(),
                        "leftovers": ws.leftovers(),
                        "checkpoints": sorted(p.name for p in (root / "models").glob("*_checkpoints/step-*")),
                        "reports": sorted(p.name for p in (root / "reports").glob("*.json"))})
    ws.interrupted = {"lock": ws.lock(), "outputs": ws.outputs(), "cached_leftovers": ws.cached_leftovers()}
    return ws


def ran_stages_in_order(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.mark.parametrize("index", range(len(KILLS)), ids=[f"{s}:{p}" for s, p in KILLS])
def test_a_stage_killed_in_the_middle_finishes_on_the_next_run(workspace, index):
    (stage, point), killed, after = KILLS[index], workspace.runs[index], workspace.runs[index + 1]
    assert killed["result"].returncode == -signal.SIGKILL, (killed["result"].returncode,
                                                            killed["result"].stderr[-3000:])
    assert f"PIPELINE_TEST_KILL_AT: killing {stage} at {point.split(':')[0]}" in killed["result"].stderr
    assert killed["ran"][-1] == stage
    assert stage in killed["status"]  # its outputs are missing or not the recorded ones
    if stage.startswith("train_stage"):
        assert killed["checkpoints"], "a checkpoint to resume from"
    elif stage == "evaluate":  # writes its reports one by one, each atomically
        assert killed["reports"] == ["metrics.json"]
    else:
        assert killed["leftovers"], "the kill left a half-written folder behind"

    # The next run starts with this stage, really runs it (DVC has nothing of it to restore), finishes it.
    assert after["ran"][0] == stage, after["ran"]
    assert stage not in after["status"], after["status"].get(stage)
    if stage.startswith("train_stage"):
        assert "resumed from" in after["result"].stderr


def test_the_interrupted_build_finishes_clean(workspace):
    last = workspace.runs[-1]
    assert last["result"].returncode == 0, last["result"].stderr[-3000:]
    assert last["status"] == {}
    assert last["leftovers"] == []  # the next write of an output removes them
    assert workspace.interrupted["cached_leftovers"] == []
    for folder in (workspace.root / "models").glob("*_checkpoints"):
        assert list(folder.iterdir()) == [], folder  # emptied when the training stage ended


def test_an_uninterrupted_forced_rebuild_writes_the_same_bytes(workspace):
    ws = workspace
    def candidates() -> dict[str, bytes]:
        files = (ws.root / "data" / "candidates").rglob("*.parquet")
        return {str(p.relative_to(ws.root)): p.read_bytes() for p in files}

    metrics, before = (ws.root / "reports" / "metrics.json").read_bytes(), candidates()
    assert len(before) == len(GENERATE_MODELS) * len(CORPORA)

    output = ws.run("dvc", "repro", "--force").stdout
    assert sorted(ran_stages(output)) == sorted(ws.run("dvc", "stage", "list", "--name-only").stdout.split())

    assert (ws.root / "reports" / "metrics.json").read_bytes() == metrics
    assert candidates() == before
    assert ws.status() == {}
    assert ws.lock() == ws.interrupted["lock"]
    outputs = ws.outputs()
    reference = ws.interrupted["outputs"]
    assert sorted(name for name in set(outputs) | set(reference) if outputs.get(name) != reference.get(name)) == []
    assert ws.leftovers() == [] and ws.cached_leftovers() == []
