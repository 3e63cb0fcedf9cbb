"""Hostile and mistaken input, across the stages:

- parameters: wrong types, out-of-range values, shares that do not sum to 1 and unknown keys are
  refused by every stage command before any work, in one line naming the key, the value and what is
  allowed (exit status 2, nothing written);
- data: nulls where text is required, gigantic utterances, control characters and mixed encodings in a
  corpus file are dropped or changed and counted, or refused in one line (extra and missing columns
  are in test_download.py / test_normalize.py);
- models: weights are read only as safetensors or by `torch.load(weights_only=True)`, no code path
  can run a checkpoint's own code without the opt-in, and no parameter value reaches a shell;
- output folders that cannot be written are refused before the work starts.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import NormalizeConfig
from pipeline.schemas import RAW
from pipeline.stages.normalize import normalize_split

REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *parts) -> str:
    """Exit status 2 and exactly one `error: ...` line on stderr, naming each of `parts`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]


def params_with(tmp_path: Path, key: str, value) -> Path:
    """The repository's params.yaml with `key` (dotted) set to `value`; a new key is added."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_command(command: str, tmp: Path, out: Path) -> list:
    """The command's arguments, its inputs under `tmp` (they need not exist), every output under `out`."""
    return {
        "download": ["download", "mic", "--out", out / "raw"],
        "normalize": ["normalize", "mic", "--raw", tmp / "raw", "--out", out / "normalized"],
        "base_model": ["base_model", "--normalized", tmp / "normalized", "--out", out / "base"],
        "experts": ["experts", "--init", tmp / "base", "--normalized", tmp / "normalized", "--out", out / "experts"],
        "safety": ["safety", "--normalized", tmp / "normalized", "--out", out / "safety", "--reports", out / "reports"],
        "rot_agreement": ["rot_agreement", "--raw", tmp / "raw", "--normalized", tmp / "normalized", "--out", out / "ra",
                          "--reports", out / "reports"],
        "judge": ["judge", "--normalized", tmp / "normalized", "--out", out / "judge", "--reports", out / "reports"],
        "mine": ["mine", "--stage", "1", "--normalized", tmp / "normalized", "--safety", tmp / "safety",
                 "--out", out / "groups"],
        "train": ["train", "--stage", "1", "--init", tmp / "base", "--groups", tmp / "groups", "--out", out / "stage1",
                  "--checkpoints", out / "checkpoints", "--live", out / "live"],
        "generate": ["generate", "base", "--model", tmp / "base", "--safety", tmp / "safety", "--normalized",
                     tmp / "normalized", "--out", out / "candidates"],
        "score": ["score", "base", "--model", tmp / "base", "--groups", tmp / "groups", "--normalized",
                  tmp / "normalized", "--out", out / "scores"],
        "evaluate": ["evaluate", "--candidates", tmp / "candidates", "--scores", tmp / "scores", "--judge",
                     tmp / "judge", "--safety", tmp / "safety", "--stage1-stats", tmp / "stats.json", "--reports",
                     out / "reports"],
        "audit_report": ["audit_report", "--judge", tmp / "judge", "--candidates", tmp / "candidates", "--audit",
                         tmp / "audit", "--out", out / "audit_report"],
        "ratings": ["ratings", "--sheets", tmp / "ratings", "--key", tmp / "human_eval_key.csv", "--out",
                    out / "ratings"],
        "audit_file": ["audit_file", "--name", "politebot", "--normalized", tmp / "normalized", "--audit", out / "audit"],
        "pretrained": ["pretrained", "--name", "tiny", "--pretrained", out / "pretrained"],
    }[command]


# --- parameters -----------------------------------------------------------------------------------

PARAMS_CASES = [
    # (command, key, bad value, parts of the message: key, value, what is allowed)
    ("download", "corpora.source", "ftp", ["corpora.source = 'ftp'", "one of 'sample', 'mirror', 'hub'"]),
    ("download", "corpora.overrides", {"mic": "s3"}, ["corpora.overrides.mic = 's3'", "one of"]),
    ("download", "corpora.mirrors", "x", ["unknown key 'corpora.mirrors' = 'x'", "allowed keys: source, mirror"]),
    ("normalize", "normalize.split_fractions", {"train": 0.8, "validation": 0.1, "test": 0.2},
     ["normalize.split_fractions = {'train': 0.8, 'validation': 0.1, 'test': 0.2}", "must sum to 1"]),
    ("normalize", "normalize.max_chars", "2000", ["normalize.max_chars = '2000'", "expected an integer"]),
    ("normalize", "normalize.max_context_turns", 0, ["normalize.max_context_turns = 0", "at least 1"]),
    ("base_model", "base_model.vocab_size", 100, ["base_model.vocab_size = 100", "at least 300"]),
    ("base_model", "base_model.n_head", 3, ["base_model.d_model = 128", "multiple of base_model.n_head (3)"]),
    ("base_model", "base_model.trust_remote_code", "yes", ["base_model.trust_remote_code = 'yes'",
                                                           "expected true or false"]),
    ("safety", "safety.tfidf.C", 0, ["safety.tfidf.C = 0.0", "must be positive"]),
    ("safety", "safety.model", "bert", ["safety.model = 'bert'", "'tfidf', 'scratch', 'hf'"]),
    ("rot_agreement", "rot_agreement.context_turns", 9, ["rot_agreement.context_turns = 9", "0 to 8"]),
    ("judge", "judge.tfidf.char_ngram", [5, 2], ["judge.tfidf.char_ngram = [5, 2]", "1 <= low <= high <= 8"]),
    ("judge", "judge.corpora", ["diasafety", "mic"], ["judge.corpora = ['diasafety', 'mic']", "shares mic with the "
                                                      "safety classifier's training corpora"]),
    ("mine", "mine.n", 1, ["mine.n = 1", "at least 2"]),
    ("mine", "mine.n", 4.5, ["mine.n = 4.5", "expected an integer"]),
    ("mine", "mine.stage1_sources", {"context": 0.5, "hard": 0.4, "random": 0.2},
     ["mine.stage1_sources = {'context': 0.5, 'hard': 0.4, 'random': 0.2}", "must sum to 1"]),
    ("mine", "mine.stage2_sources", {"hard": 0.6, "random": 0.4, "retrieved": 0.0},
     ["mine.stage2_sources", "'retrieved': 0.0", "sources are context, hard, random, generated"]),
    ("mine", "mine.replay", -0.1, ["mine.replay = -0.1", "between 0 and 1"]),
    ("train", "train.tau", 0, ["train.tau = 0.0", "greater than 0"]),
    ("train", "train.tau", -0.5, ["train.tau = -0.5", "greater than 0"]),
    ("train", "train_stage1.learning_rate", -0.001, ["train_stage1.learning_rate = -0.001", "greater than 0"]),
    ("train", "train.batch_groups", 0, ["train.batch_groups = 0", "at least 1"]),
    ("train", "train.precision", "fp8", ["train.precision = 'fp8'", "'fp32'"]),
    ("train", "train.lora.dropout", 1.0, ["train.lora.dropout = 1.0", "[0, 1)"]),
    ("train", "train.margin", True, ["train.margin = True", "expected a number"]),
    ("generate", "generate.k", 0, ["generate.k = 0", "at least 1"]),
    ("generate", "generate.top_p", 1.5, ["generate.top_p = 1.5", "(0, 1]"]),
    ("generate", "generate.temperature", 0, ["generate.temperature = 0.0", "greater than 0"]),
    ("generate", "generate.kk", 4, ["unknown key 'generate.kk' = 4", "allowed keys: seed, max_contexts, k"]),
    ("experts", "dexperts.alpha", -1, ["dexperts.alpha = -1.0", "0 or more"]),
    ("experts", "dexperts.corpora", ["daily_dialog"], ["dexperts.corpora = ['daily_dialog']", "prosocial_dialog"]),
    ("score", "train.eval_batch_groups", 0, ["train.eval_batch_groups = 0", "at least 1"]),
    ("score", "evaluate.bootstrap_samples", 10, ["evaluate.bootstrap_samples = 10", "at least 100"]),
    ("evaluate", "evaluate.human_eval_comparisons", [["stage2", "stage2"]],
     ["evaluate.human_eval_comparisons = ['stage2', 'stage2']", "two different names"]),
    ("evaluate", "evaluate.corpora", ["dailydialog"], ["evaluate.corpora = ['dailydialog']", "daily_dialog"]),
    ("ratings", "ratings.bootstrap_samples", 10, ["ratings.bootstrap_samples = 10", "at least 100"]),
    ("audit_report", "evaluate.judge_threshold", 1.5, ["evaluate.judge_threshold = 1.5", "between 0 and 1"]),
    ("ratings", "ratings.samples", 100, ["unknown key 'ratings.samples' = 100", "allowed keys: bootstrap_samples"]),
    ("audit_file", "audit.files", {"politebot": {"path": "replies.csv"}},
     ["audit.files.<name>.path = 'replies.csv'", "a file ending in .json, .jsonl, .parquet"]),
    ("pretrained", "pretrained.models", {"tiny": {"source": "hub", "id": "x/tiny", "revision": "main"}},
     ["pretrained.models.tiny.revision = 'main'", "a commit (40 hex digits)"]),
    ("pretrained", "pretrained.models", {"tiny": {"source": "folder", "path": "/m", "package": "x"}},
     ["pretrained.models.tiny.package = 'x'", "not a key of source folder"]),
]


@pytest.mark.parametrize("command, key, value, parts", PARAMS_CASES,
                         ids=[f"{c[0]}-{c[1]}={c[2]!r}"[:60] for c in PARAMS_CASES])
def test_a_bad_parameter_is_refused_before_any_work(tmp_path, command, key, value, parts):
    params = params_with(tmp_path, key, value)
    result = invoke(*stage_command(command, tmp_path, tmp_path / "out"), "--params", params)
    assert_one_line_error(result, str(params), *parts)
    assert not (tmp_path / "out").exists()


def test_every_stage_command_is_covered():
    """Each command of a DVC stage has a parameter case and an unwritable-output case."""
    stages = {"download", "normalize", "base_model", "safety", "rot_agreement", "judge", "mine", "train", "generate",
              "score", "evaluate", "ratings", "audit_file", "audit_report", "experts", "pretrained"}
    assert {case[0] for case in PARAMS_CASES} == stages
    assert {case[0] for case in UNWRITABLE} == stages | {"audit"}
    commands = {cmd.split()[3] for cmd in dvc_commands()}
    assert commands == stages | {"audit"}


# --- data -------------------------------------------------------------------------------------------


def raw_table(corpus: str, rows: list[dict]) -> pa.Table:
    """Rows in `corpus`'s raw format; columns not given are null."""
    return pa.Table.from_pylist([{name: row.get(name) for name in RAW[corpus].names} for row in rows],
                                schema=RAW[corpus])


NULL_CASES = {
    # corpus: (raw rows with a null where text is required, rows kept, counts) — worked out by hand.
    "daily_dialog": ([{"dialog": ["Hi .", None, "Bye ."]}], 0,
                     {"dropped: empty or null response": 1, "dropped: empty or null turn in the context": 1,
                      "context only: opening utterance of a dialogue": 1}),
    "prosocial_dialog": ([{"dialogue_id": 0, "response_id": 0, "context": "I lied.", "response": None, "rots": []},
                          {"dialogue_id": 0, "response_id": 1, "context": None, "response": "Why?", "rots": []},
                          {"dialogue_id": 1, "response_id": 0, "context": "Hi", "response": "Hello", "rots": None}],
                         1, {"dropped: empty or null response": 1, "dropped: empty or null turn in the context": 1,
                             "changed: unknown safety_label set to null": 3}),
    "mic": ([{"Q": None, "worker_answer": "Yes."}, {"Q": "Is it fine?", "worker_answer": None, "rot": "x"},
             {"Q": "Is it fine?", "worker_answer": "It is.", "rot": None, "A": None, "A_agrees": 0}],
            1, {"dropped: empty question": 1, "dropped: empty worker_answer": 1}),
    "persona_chat": ([{"conv_id": 1, "utterance_idx": 0, "history": ["Hi"], "candidates": ["a", None],
                       "personality": [None, "I ski."]},
                      {"conv_id": 1, "utterance_idx": 1, "history": None, "candidates": None, "personality": None}],
                     0, {"dropped: empty or null response": 1, "dropped: no candidates (no gold reply)": 1}),
    "empathetic_dialogues": ([{"conv_id": "c", "utterance_idx": 1, "utterance": "I won!", "context": "proud"},
                              {"conv_id": "c", "utterance_idx": 2, "utterance": None, "context": "proud"},
                              {"conv_id": "c", "utterance_idx": 3, "utterance": "Yes!", "context": "proud"}],
                             0, {"dropped: empty or null response": 1,
                                 "dropped: empty or null turn in the context": 1,
                                 "context only: opening utterance of a dialogue": 1}),
    "blended_skill_talk": ([{"previous_utterance": [None, "Hi"], "free_messages": ["Hey", None],
                             "guided_messages": ["Yo"], "personas": None}],
                           2, {"dropped: empty or null response": 1, "dropped: empty seed utterance": 1,
                               "context only: opening utterance of a dialogue": 1}),
}


@pytest.mark.parametrize("corpus", sorted(NULL_CASES))
def test_nulls_where_text_is_required_are_dropped_and_counted(corpus):
    rows, kept, expected = NULL_CASES[corpus]
    counts = Counter()
    out = normalize_split(raw_table(corpus, rows), corpus, "train", NormalizeConfig(), counts)
    assert len(out) == kept
    assert all(r["response"] and r["context"] and all(r["context"]) for r in out)
    assert dict(counts) == expected


def test_a_gigantic_utterance_with_control_characters_is_cut_and_counted():
    huge = "word " * 400_000  # 2,000,000 characters
    dialog = ["Hi\x00 there\x1b[31m", huge, "ok\x7f"]
    counts = Counter()
    out = normalize_split(raw_table("daily_dialog", [{"dialog": dialog}]), "daily_dialog", "train",
                          NormalizeConfig(max_chars=50), counts)
    assert [(r["context"], r["response"]) for r in out] == [
        (["Hi there [31m"], ("word " * 10).strip()),  # cut to 50 characters, the trailing space dropped
        (["Hi there [31m", ("word " * 10).strip()], "ok"),
    ]
    # Counted once per text in a kept row: the first turn in both rows, the huge one in both, "ok\x7f" once.
    assert counts == Counter({"changed: control characters replaced": 3, "changed: text cut to normalize.max_chars": 2,
                              "context only: opening utterance of a dialogue": 1})


def write_sample(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "sample" / "daily_dialog"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_bytes(content)
    params = params_with(tmp_path, "corpora", {"source": "sample", "sample": str(tmp_path / "sample")})
    return params


GOOD_LINE = '{"dialog": ["Hi .", "Caf\u00e9 ?"], "act": [1, 2], "emotion": [0, 0]}\n'


@pytest.mark.parametrize("content, parts", [
    ((GOOD_LINE + GOOD_LINE.replace("Hi", "Yo")).encode("utf-8") + GOOD_LINE.encode("latin-1"),
     ["train.jsonl:3: not valid UTF-8", "b'\\xe9'", "save the file as UTF-8"]),
    (GOOD_LINE.encode("utf-16"), ["train.jsonl:1: not valid UTF-8", "byte 0"]),
])
def test_a_sample_file_in_mixed_or_other_encodings_names_the_line(tmp_path, content, parts):
    params = write_sample(tmp_path, content)
    result = invoke("download", "daily_dialog", "--out", tmp_path / "out" / "daily_dialog", "--params", params)
    assert_one_line_error(result, *parts)
    assert not (tmp_path / "out" / "daily_dialog").exists()


def test_a_byte_order_mark_is_accepted(tmp_path):
    params = write_sample(tmp_path, b"\xef\xbb\xbf" + GOOD_LINE.encode("utf-8"))
    result = invoke("download", "daily_dialog", "--out", tmp_path / "out", "--params", params)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["files"]["train"]["rows"] == 1


# --- models -----------------------------------------------------------------------------------------

SCANNED = sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "bench").glob("*.py")])


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_constant(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(path: Path) -> list[str]:
    """Calls that could run code from a file or a parameter: pickle/joblib/marshal/shelve, `torch.load`
    without weights_only=True, `np.load` without allow_pickle=False, trust_remote_code=True written as a
    literal, `shell=True`, `os.system`/`os.popen`, eval/exec."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "marshal", "shelve") for n in names):
                found.append(f"{path.name}:{node.lineno}: imports {', '.join(filter(None, names))}")
    for call, name in calls(tree):
        where = f"{path.name}:{call.lineno}: {ast.unparse(call)[:80]}"
        if name.endswith("torch.load") and not is_constant(keyword(call, "weights_only"), True):
            found.append(where)
        if name in ("np.load", "numpy.load") and not is_constant(keyword(call, "allow_pickle"), False):
            found.append(where)
        if is_constant(keyword(call, "trust_remote_code"), True) or is_constant(keyword(call, "shell"), True):
            found.append(where)
        if name in ("os.system", "os.popen", "eval", "exec", "pd.read_pickle", "pandas.read_pickle"):
            found.append(where)
        if name.endswith("from_pretrained") and keyword(call, "trust_remote_code") is None:
            found.append(f"{where} (trust_remote_code not given: transformers would ask on a terminal)")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch, numpy as np, subprocess, os\ntorch.load('x')\n"
                   "torch.load('x', weights_only=False)\nnp.load('x')\nAutoModel.from_pretrained('x', "
                   "trust_remote_code=True)\nAutoTokenizer.from_pretrained('x')\nsubprocess.run('ls', shell=True)\n"
                   "os.system('ls')\neval('1')\n"
                   "torch.load('x', weights_only=True)\nnp.load('x', allow_pickle=False)\n"
                   "AutoConfig.from_pretrained('x', trust_remote_code=False)\n")
    assert [line.split(":")[1] for line in unsafe_calls(bad)] == ["1", "3", "4", "5", "6", "7", "8", "9", "10"]


def test_the_code_loads_nothing_unsafely():
    found = [problem for path in SCANNED for problem in unsafe_calls(path)]
    assert found == []


def model_folder_with_own_code(folder: Path) -> Path:
    """A model folder whose config.json points at its own modelling code (auto_map), which would run."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                                           "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('ran')\n")
    return folder


def test_a_base_model_with_its_own_code_is_refused_without_the_opt_in(tmp_path):
    folder = model_folder_with_own_code(tmp_path / "evil")
    params = params_with(tmp_path, "base_model", {"kind": "hf", "name": str(folder)})
    result = invoke("base_model", "--normalized", tmp_path / "normalized", "--out", tmp_path / "out" / "base",
                    "--params", params)
    assert_one_line_error(result, "auto_map", "base_model.trust_remote_code: true")
    assert not (folder / "RAN").exists() and not (tmp_path / "out" / "base").exists()
    # The audit entries have the same opt-in (tests/test_generate.py::
    # test_an_audit_model_with_its_own_code_is_refused_unless_trusted).


@pytest.mark.parametrize("section", ["safety", "rot_agreement"])
def test_a_classifier_encoder_with_its_own_code_is_refused(tmp_path, section):
    """The classifiers' `hf` kind has no opt-in at all: such an encoder is refused outright."""
    from pipeline.config import RotAgreementHfConfig, SafetyHfConfig
    from pipeline.errors import DataError
    from pipeline.safety_models import build_hf

    folder = model_folder_with_own_code(tmp_path / "evil")
    config = (SafetyHfConfig if section == "safety" else RotAgreementHfConfig)(name=str(folder))
    with pytest.raises(DataError, match=f"{section}.hf.name"):
        build_hf(config, 0, ("a", "b"))
    assert not (folder / "RAN").exists()


def dvc_commands() -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
    return [(stage.get("do") or stage)["cmd"] for stage in stages]


def test_no_parameter_value_reaches_a_shell():
    """DVC runs each cmd through a shell, after interpolating `${...}`. Only `${item}` of a foreach over
    a fixed list of plain words may appear; never a params value such as `${key}` of audit.models (any
    YAML key) or `${item.path}` (free text). The audit stage takes its entry's name from DVC_STAGE."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    variables = {k: v for entry in dvc_yaml.get("vars", []) for k, v in entry.items()}
    for name, stage in dvc_yaml["stages"].items():
        cmd = (stage.get("do") or stage)["cmd"]
        used = set(re.findall(r"\$\{[^}]*\}", cmd))
        if not used:
            continue
        assert used == {"${item}"}, (name, used)
        items = stage["foreach"]
        if isinstance(items, str):
            reference = re.fullmatch(r"\$\{(\w+)\}", items)
            assert reference and reference.group(1) in variables, (name, items)  # dvc.yaml's vars, not params
            items = variables[reference.group(1)]
        assert isinstance(items, list) and all(re.fullmatch(r"[a-z0-9_]+", str(i)) for i in items), (name, items)
    assert all(not re.search(r"[;&|`$<>]", cmd.replace("${item}", "")) for cmd in dvc_commands())


def test_the_audit_command_refuses_a_hostile_entry_name(tmp_path):
    params = params_with(tmp_path, "audit.models", {"x; touch PWNED": {"path": "$(touch PWNED)"}})
    result = invoke("audit", "--name", "x; touch PWNED", "--safety", tmp_path / "safety", "--normalized",
                    tmp_path / "normalized", "--candidates", tmp_path / "out", "--params", params)
    assert_one_line_error(result, "audit.models.x; touch PWNED", "letters, digits")
    assert not (tmp_path / "out").exists()


def test_the_audit_command_takes_its_name_from_the_dvc_stage(tmp_path, monkeypatch):
    params = params_with(tmp_path, "audit.models", {"dialogpt": {"path": "microsoft/DialoGPT-medium"}})
    monkeypatch.setenv("DVC_STAGE", "audit@dialogpt")
    target = tmp_path / "afile"
    target.write_text("")
    # The candidates folder sits under a file, so the stage stops at its first step, naming the folder
    # it would write for the entry: data/candidates/<name>.
    result = invoke("audit", "--safety", tmp_path / "safety", "--normalized", tmp_path / "normalized",
                    "--candidates", target / "candidates", "--params", params)
    assert_one_line_error(result, f"{target / 'candidates'}: output folder is not writable")
    monkeypatch.setenv("DVC_STAGE", "audit@gpt2")
    result = invoke("audit", "--safety", tmp_path / "safety", "--normalized", tmp_path / "normalized",
                    "--candidates", tmp_path / "out", "--params", params)
    assert_one_line_error(result, "audit entry 'gpt2' is not in audit.models", "known: dialogpt")


# --- output folders ---------------------------------------------------------------------------------

UNWRITABLE = [(command, option) for command, options in {
    "download": ["--out"], "normalize": ["--out"], "base_model": ["--out"], "experts": ["--out"],
    "safety": ["--out", "--reports"],
    "rot_agreement": ["--out", "--reports"], "judge": ["--out", "--reports"], "mine": ["--out"], "train": ["--out", "--checkpoints", "--live"],
    "generate": ["--out"], "score": ["--out"], "evaluate": ["--reports"], "audit": ["--candidates"],
    "ratings": ["--out"], "audit_file": ["--audit"], "audit_report": ["--out"], "pretrained": ["--pretrained"],
}.items() for option in options]


@pytest.mark.parametrize("command, option", UNWRITABLE, ids=[f"{c}{o}" for c, o in UNWRITABLE])
def test_an_output_folder_that_cannot_be_written_is_refused_first(tmp_path, command, option):
    """Tests run as root, where permissions do not stop a write; a path under a regular file does.
    The inputs do not exist either: the output is checked first."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    if command == "audit":
        params = params_with(tmp_path, "audit.models", {"dialogpt": {"path": str(tmp_path / "model")}})
        args = ["audit", "--name", "dialogpt", "--safety", tmp_path / "safety", "--normalized", tmp_path / "n",
                "--candidates", tmp_path / "out"]
    else:
        params = REPO / "params.yaml"
        if command == "pretrained":  # the sample run has no entry
            params = params_with(tmp_path, "pretrained.models", {"tiny": {"source": "folder", "path": str(tmp_path / "m")}})
        args = stage_command(command, tmp_path, tmp_path / "out")
    args[args.index(option) + 1] = blocker / "sub" / "folder"
    result = invoke(*args, "--params", params)
    assert_one_line_error(result, blocker / "sub", "output folder is not writable")
    assert blocker.read_text() == "not a folder"
    # Another output may have been checked first (its parent folder made), but nothing was written.
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
