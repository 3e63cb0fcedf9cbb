"""The corpora are registered once: `config.CORPORA` is the list that dvc.yaml's `corpus_names`, the bundled
sample, both presets' hub entries and evaluate's corpora give, every stage that reads one file per corpus
lists each of them as a dep, and the groups partition it. The re-ranker's classifier (`safety`) never
reads the human-labelled dialog-safety corpora, which the judge keeps for itself."""

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import (
    ADVERSARIAL_CORPORA, CASUAL_CORPORA, CORPORA, DIALOG_SAFETY_CORPORA, SPLITS, SafetyConfig, load_section,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["params.yaml", "params.paper.yaml"]


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def corpus_deps(deps: list[str], name: str) -> list[str]:
    """The corpora of the deps `data/normalized/<corpus>/<name>` (or the folder, for `name` "")."""
    prefix = "data/normalized/"
    return [d[len(prefix):].removesuffix(f"/{name}" if name else "") for d in deps
            if d.startswith(prefix) and (d.endswith(f"/{name}") if name else d.count("/") == 2)]


def test_the_eight_corpora_and_their_groups():
    assert CORPORA == ("prosocial_dialog", "mic", "daily_dialog", "persona_chat", "empathetic_dialogues",
                       "blended_skill_talk", "diasafety", "toxichat")
    assert sorted(ADVERSARIAL_CORPORA + CASUAL_CORPORA) == sorted(CORPORA)  # a partition
    assert set(DIALOG_SAFETY_CORPORA) == {"diasafety", "toxichat"} and set(DIALOG_SAFETY_CORPORA) <= set(ADVERSARIAL_CORPORA)


def test_dvc_yaml_and_the_sample_name_every_corpus():
    spec = dvc_yaml()
    assert spec["vars"][0]["corpus_names"] == list(CORPORA)
    sample = REPO / "data" / "sample"
    assert sorted(p.name for p in sample.iterdir() if p.is_dir() and p.name != "audit") == sorted(CORPORA)
    for corpus in CORPORA:
        assert sorted(p.stem for p in (sample / corpus).glob("*.jsonl")) == sorted(SPLITS), corpus
    stages = spec["stages"]
    assert corpus_deps(stages["base_model"]["deps"], "train.parquet") == list(CORPORA)
    for name in ("generate", "audit"):
        assert corpus_deps(stages[name]["do"]["deps"], "test.parquet") == list(CORPORA), name


@pytest.mark.parametrize("name", PRESETS)
def test_both_presets_know_every_corpus(name):
    params = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
    assert sorted(params["corpora"]["hub"]) == sorted(CORPORA)
    assert params["evaluate"]["corpora"] == list(CORPORA)


def test_the_sample_dag_runs_download_and_normalize_for_every_corpus(tmp_path):
    """`dvc stage list` resolves the foreach stages to one per corpus of `CORPORA`, nothing else."""
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists():
        pytest.skip("dvc is not installed beside this Python")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([str(dvc), "stage", "list", "--name-only"], cwd=tmp_path, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    for stage in ("download", "normalize"):
        found = sorted(s.split("@", 1)[1] for s in listed.stdout.split() if s.startswith(f"{stage}@"))
        assert found == sorted(CORPORA), stage


def test_safety_never_reads_the_dialog_safety_corpora(tmp_path, normalized_sample_dir):
    """Its deps name ProsocialDialog and MIC only, and it trains with nothing else in the folder."""
    deps = dvc_yaml()["stages"]["safety"]["deps"]
    assert sorted(corpus_deps(deps, "")) == ["mic", "prosocial_dialog"]
    assert not any(corpus in dep for dep in deps for corpus in DIALOG_SAFETY_CORPORA)
    from pipeline.stages import safety

    for corpus in ("prosocial_dialog", "mic"):
        shutil.copytree(normalized_sample_dir / corpus, tmp_path / "normalized" / corpus)
    config = load_section(REPO / "params.yaml", "safety", SafetyConfig)
    safety.run(config, tmp_path / "normalized", tmp_path / "safety", tmp_path / "reports")
    assert (tmp_path / "safety" / "scorer.json").is_file()


def test_every_corpus_reaches_generate_with_its_category(normalized_sample_dir):
    """The sample's DiaSafety and ToxiChat test splits hold contexts whose every reply is unsafe (an
    adversarial context without a reference), and DiaSafety's carry their category."""
    from pipeline.stages.generate import distinct_contexts, read_test_rows

    diasafety = distinct_contexts(read_test_rows(normalized_sample_dir, "diasafety"))
    assert all(c["category"] is not None for c in diasafety)
    assert any(not c["references"] for c in diasafety) and any(c["references"] for c in diasafety)
    rows = pq.read_table(normalized_sample_dir / "diasafety" / "test.parquet").to_pylist()
    for context in diasafety:
        safe = [r["response"] for r in rows if r["context"] == context["context"] and r["reply_label"] == "safe"]
        assert context["references"] == safe
