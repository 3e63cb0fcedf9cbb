"""The configurations — the default sample run (params.yaml), the paper-scale preset
(params.paper.yaml) and the real-corpora preset (params.real.yaml) — are complete and valid, and
every stage of dvc.yaml resolves against them."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import SECTIONS, load_all
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["params.yaml", "params.paper.yaml", "params.real.yaml", "params.real-scratch.yaml"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_section_is_present_and_valid(name):
    sections = load_all(REPO / name)
    assert set(sections) == set(SECTIONS)
    assert set(yaml.safe_load((REPO / name).read_text())) == set(SECTIONS)


def test_load_all_names_an_unknown_section(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["trian"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_all(tmp_path / "params.yaml")


def test_the_paper_preset_is_paper_scale():
    paper = load_all(REPO / "params.paper.yaml")
    assert paper["corpora"].source == "hub"
    assert paper["base_model"].kind == "hf" and paper["base_model"].name == "facebook/blenderbot-400M-distill"
    assert paper["safety"].model == "hf" and paper["rot_agreement"].model == "hf"
    assert paper["train"].processes > 1 and paper["train"].precision == "bf16"
    assert paper["train_stage1"].epochs >= 1 and paper["train_stage2"].epochs >= 1
    assert set(paper["audit"].models) <= set(paper["evaluate"].models)


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def declared_params(dvc_yaml: dict, params: dict) -> dict[str, list[str]]:
    """Every stage's declared params keys, with foreach items substituted (our own resolution, so a
    key that a stage declares but the file lacks is caught without DVC)."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" in stage:
            items = stage["foreach"]
            if isinstance(items, str):  # ${vars} or ${params.path}
                ref = items.strip("${}")
                items = dvc_yaml["vars"][0][ref] if ref in dvc_yaml["vars"][0] else _lookup(params, ref)
            pairs = items.items() if isinstance(items, dict) else [(None, item) for item in items]
            for key, item in pairs:
                keys = []
                for entry in stage["do"].get("params", []):
                    text = entry.replace("${item}", str(item) if not isinstance(item, dict) else "")
                    keys.append(text.replace("${key}", str(key)))
                out[f"{name}@{key if key is not None else item}"] = keys
        else:
            out[name] = list(stage.get("params", []))
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_every_declared_param_exists(name):
    params = yaml.safe_load((REPO / name).read_text())
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for stage, keys in declared_params(dvc_yaml, params).items():
        for key in keys:
            assert isinstance(key, str), (stage, key)
            _lookup(params, key)  # raises KeyError naming the missing key
    assert "${" not in str(declared_params(dvc_yaml, params))


@pytest.mark.parametrize("name", PRESETS)
def test_dvc_resolves_every_stage(tmp_path, name):
    """`dvc stage list` in a scratch repo with this preset as params.yaml: templating (foreach over the
    corpora, the models, the audit entries and the pretrained entries) resolves, and the audit and
    pretrained stages appear, one per entry (none for an empty mapping: the sample run's `models: {}`)."""
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists():
        pytest.skip("dvc is not installed beside this Python")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / name, tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([str(dvc), "stage", "list", "--name-only"], cwd=tmp_path, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    stages = set(listed.stdout.split())
    params = yaml.safe_load((REPO / name).read_text())
    expected = {"base_model", "safety", "rot_agreement", "mine_stage1", "mine_stage2", "train_stage1",
                "train_stage2", "train_stage1_ce", "train_stage2_ce", "evaluate"}
    corpora = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]["corpus_names"]
    expected |= {f"{stage}@{corpus}" for stage in ("download", "normalize") for corpus in corpora}
    expected |= {f"{stage}@{model}" for stage in ("generate", "score") for model in ("base", "ce", "stage1", "stage2")}
    expected |= {f"audit@{model}" for model in params["audit"]["models"]}
    assert expected <= stages, expected - stages
    pretrained = {stage for stage in stages if stage.startswith("pretrained")}
    assert pretrained == {f"pretrained@{entry}" for entry in params["pretrained"]["models"]}


@pytest.mark.parametrize("preset, judge", [("params.yaml", "tfidf"), ("params.real.yaml", "ensemble")])
def test_make_audit_applies_its_overrides_to_the_preset(tmp_path, preset, judge):
    """`make audit` (AUDIT_PRESET=...) as `dvc exp run` applies its -S overrides: the mirror's corpora with the
    sample's MIC and ProsocialDialog, the ten chatbots' replies, and the preset's own judge."""
    from dvc.utils.hydra import apply_overrides

    printed = subprocess.run(["make", "-n", "audit", f"AUDIT_PRESET={preset}"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    command = next(line for line in printed.splitlines() if "dvc exp run" in line)
    assert command.startswith("cp params.real.yaml params.yaml") == (preset != "params.yaml")
    words = shlex.split(command.split("dvc exp run", 1)[1].split(";")[0])
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / preset, params)
    apply_overrides(str(params), [words[i + 1] for i, word in enumerate(words) if word == "-S"])
    sections = load_all(params)
    assert sections["corpora"].source == "mirror"
    assert yaml.safe_load(params.read_text())["corpora"]["overrides"] == {"mic": "sample", "prosocial_dialog": "sample"}
    files = yaml.safe_load(params.read_text())["audit"]["files"]
    assert len(files) == 10 and files["toxichat_gpt3"] == {"path": "data/normalized/toxichat/test.parquet",
                                                           "responder": "gpt3"}
    assert files["plato2_large"]["path"].endswith("diasafety/generations/plato2_large_val.json")
    assert sections["judge"].model == judge
