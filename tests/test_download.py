"""The `download` stage: the three sources (sample, mirror, hub through local files), the `mirror`
command, and bad input, which must end in one line on stderr, exit status 2 and no output."""

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import CORPORA, SPLITS, CorporaConfig, HubCorpus
from pipeline.errors import DataError
from pipeline.schemas import RAW
from pipeline.stages import download

MIRROR_CORPORA = tuple(c for c in CORPORA if c != "mic")  # ../shared/mirror has no MIC

# Three hand-written DailyDialog dialogues, the smallest corpus row format.
DAILY_DIALOG_ROWS = [
    {"dialog": ["Hi , how are you ?", "Fine , thanks .", "Good to hear ."], "act": [2, 1, 1], "emotion": [0, 0, 4]},
    {"dialog": ["Can I help you ?", "Just looking ."], "act": [3, 2], "emotion": [0, 0]},
    {"dialog": ["Where is the bank ?", "Two blocks away .", "Thanks !", "Sure ."],
     "act": [2, 1, 4, 4], "emotion": [0, 0, 4, 0]},
]


def daily_dialog_table(rows=DAILY_DIALOG_ROWS) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW["daily_dialog"])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_params(tmp_path: Path, **corpora) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"corpora": corpora}), encoding="utf-8")  # JSON is YAML
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def assert_one_line_error(result, *parts) -> str:
    """Exit status 2, exactly one `error: ...` line on stderr naming each of `parts`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache inside the test's folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also where the hub libraries already read it at import."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# --- sample -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", CORPORA)
def test_sample_download_writes_every_split_and_checksums(raw_sample_dir, repo_root, corpus):
    folder = raw_sample_dir / corpus
    assert sorted(p.name for p in folder.iterdir()) == ["stats.json", "test.parquet", "train.parquet",
                                                        "validation.parquet"]
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["corpus"] == corpus and stats["source"] == "sample"
    assert sorted(stats["files"]) == sorted(SPLITS)
    for split in SPLITS:
        path = folder / f"{split}.parquet"
        lines = [line for line in (repo_root / "data" / "sample" / corpus / f"{split}.jsonl")
                 .read_text(encoding="utf-8").splitlines() if line.strip()]
        table = pq.read_table(path)
        assert table.schema.equals(RAW[corpus])
        assert table.num_rows == len(lines) == stats["files"][split]["rows"] > 0
        assert stats["files"][split]["sha256"] == file_sha256(path)
        # Values survive the trip: the first row equals the first JSON line.
        assert table.slice(0, 1).to_pylist()[0] == json.loads(lines[0])


def test_sample_download_through_the_cli(tmp_path, repo_root):
    params = write_params(tmp_path, source="sample", sample=str(repo_root / "data" / "sample"))
    result = invoke("download", "mic", "--out", tmp_path / "raw" / "mic", "--params", params)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "raw" / "mic").iterdir()) == \
        ["stats.json", "test.parquet", "train.parquet", "validation.parquet"]


def test_download_is_byte_identical_across_runs(tmp_path, repo_root):
    config = CorporaConfig(sample=str(repo_root / "data" / "sample"))
    download.run(config, "prosocial_dialog", tmp_path / "a")
    download.run(config, "prosocial_dialog", tmp_path / "b")
    for name in ("train.parquet", "validation.parquet", "test.parquet", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# --- mirror -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", MIRROR_CORPORA)
def test_download_from_the_shared_mirror(raw_mirror_dir, shared_dir, corpus):
    mirror_files = sorted((shared_dir / "mirror" / corpus).glob("*.parquet"))
    raw = raw_mirror_dir / corpus
    stats = json.loads((raw / "stats.json").read_text())
    assert stats["source"] == "mirror"
    assert sorted(stats["files"]) == sorted(p.stem for p in mirror_files)  # only the splits it has
    assert sorted(raw.glob("*.parquet")) == sorted(raw / p.name for p in mirror_files)
    for mirror_file in mirror_files:
        path = raw / mirror_file.name
        original, written = pq.read_table(mirror_file), pq.read_table(path)
        assert written.num_rows == original.num_rows == stats["files"][mirror_file.stem]["rows"]
        assert stats["files"][mirror_file.stem]["sha256"] == file_sha256(path)
        for field in RAW[corpus]:
            assert written.column(field.name).equals(original.column(field.name).cast(field.type)), field.name


def test_download_from_a_tiny_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "daily_dialog").mkdir(parents=True)
    pq.write_table(daily_dialog_table(DAILY_DIALOG_ROWS[:2]), mirror / "daily_dialog" / "train.parquet")
    # A mirror file may use narrower integer types and carry extra columns.
    extra = daily_dialog_table(DAILY_DIALOG_ROWS[2:]).append_column("id", pa.array(["x"]))
    extra = extra.set_column(1, "act", extra.column("act").cast(pa.list_(pa.int32())))
    pq.write_table(extra, mirror / "daily_dialog" / "validation.parquet")

    stats = download.run(CorporaConfig(source="mirror", mirror=str(mirror)), "daily_dialog", tmp_path / "raw")

    assert stats["source"] == "mirror" and stats["location"] == str(mirror)
    assert {s: f["rows"] for s, f in stats["files"].items()} == {"train": 2, "validation": 1}
    assert pq.read_table(tmp_path / "raw" / "train.parquet").to_pylist() == DAILY_DIALOG_ROWS[:2]
    validation = pq.read_table(tmp_path / "raw" / "validation.parquet")
    assert validation.schema.equals(RAW["daily_dialog"]) and validation.to_pylist() == DAILY_DIALOG_ROWS[2:]
    assert not (tmp_path / "raw" / "test.parquet").exists()


# --- hub, through the same functions on local files ------------------------------------------------


def test_hub_download_reads_a_dataset_folder_with_load_dataset(tmp_path, hf_cache):
    repo = tmp_path / "repo"
    repo.mkdir()
    for split, rows in zip(SPLITS, ([DAILY_DIALOG_ROWS[0], DAILY_DIALOG_ROWS[1]], [DAILY_DIALOG_ROWS[2]],
                                    [DAILY_DIALOG_ROWS[1]])):
        table = daily_dialog_table(rows).append_column("extra", pa.array(range(len(rows))))
        pq.write_table(table, repo / f"{split}.parquet")
    config = CorporaConfig(overrides={"daily_dialog": "hub"},
                           hub={"daily_dialog": HubCorpus(repo=str(repo), revision="main")})

    stats = download.run(config, "daily_dialog", tmp_path / "raw")

    assert {k: stats[k] for k in ("source", "location", "revision", "commit")} == \
        {"source": "hub", "location": str(repo), "revision": "main", "commit": "local"}
    assert {s: f["rows"] for s, f in stats["files"].items()} == {"train": 2, "validation": 1, "test": 1}
    assert pq.read_table(tmp_path / "raw" / "train.parquet").to_pylist() == DAILY_DIALOG_ROWS[:2]
    assert pq.read_table(tmp_path / "raw" / "validation.parquet").to_pylist() == DAILY_DIALOG_ROWS[2:]
    assert pq.read_table(tmp_path / "raw" / "test.parquet").column_names == RAW["daily_dialog"].names


def sample_mic_rows(repo_root) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (repo_root / "data" / "sample" / "mic" / f"{split}.jsonl")
                    .read_text(encoding="utf-8").splitlines() if line.strip()] for split in SPLITS}


def write_mic_zip(folder: Path, rows: list[dict]) -> Path:
    """MIC.zip holding MIC.csv with the sample's rows, plus a column the pipeline does not use."""
    columns = list(RAW["mic"].names) + ["rot-id"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for number, row in enumerate(rows):
        writer.writerow({**{k: "" if v is None else v for k, v in row.items()}, "rot-id": f"r{number}"})
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "MIC.zip", "w") as archive:
        archive.writestr("MIC/MIC.csv", text.getvalue())
    return folder / "MIC.zip"


def test_hub_download_reads_mic_from_its_zip(tmp_path, repo_root):
    rows = sample_mic_rows(repo_root)
    assert {row["split"] for row in rows["validation"]} <= {"dev", "valid", "validation"}
    repo = tmp_path / "SALT-NLP-MIC"
    write_mic_zip(repo, rows["train"] + rows["validation"] + rows["test"])
    config = CorporaConfig(overrides={"mic": "hub"},
                           hub={"mic": HubCorpus(repo=str(repo), revision="main", file="MIC.zip")})

    stats = download.run(config, "mic", tmp_path / "raw")

    assert stats["source"] == "hub" and stats["commit"] == "local"
    for split in SPLITS:
        written = pq.read_table(tmp_path / "raw" / f"{split}.parquet")
        assert written.schema.equals(RAW["mic"])
        assert stats["files"][split]["rows"] == written.num_rows == len(rows[split])
        for column in ("Q", "A", "rot", "A_agrees", "violation-severity", "rot-agree"):
            assert written.column(column).to_pylist() == [row[column] for row in rows[split]], column
        assert written.column("worker_answer").to_pylist() == [row["worker_answer"] or "" for row in rows[split]]


@pytest.mark.parametrize("content, reason", [
    (b"PK not really a zip", "not a zip archive"),
    ("zip-without-csv", "archive has no MIC.csv"),
])
def test_a_broken_mic_archive_is_named(tmp_path, content, reason):
    repo = tmp_path / "repo"
    repo.mkdir()
    if content == "zip-without-csv":
        with zipfile.ZipFile(repo / "MIC.zip", "w") as archive:
            archive.writestr("README.md", "nothing here")
    else:
        (repo / "MIC.zip").write_bytes(content)
    with pytest.raises(DataError, match=reason) as error:
        download.fetch_hub(HubCorpus(repo=str(repo), revision="main", file="MIC.zip"), "mic")
    assert str(repo / "MIC.zip") in str(error.value)


@pytest.mark.parametrize("corpus, hub", [
    ("daily_dialog", {"repo": "no-such-org-t2/no-such-dataset", "revision": "refs/convert/parquet"}),
    ("mic", {"repo": "no-such-org-t2/no-such-mic", "revision": "main", "file": "MIC.zip"}),
])
def test_a_network_failure_names_the_corpus_and_points_to_the_mirror(tmp_path, offline, hf_cache, corpus, hub):
    params = write_params(tmp_path, overrides={corpus: "hub"}, hub={corpus: hub})
    out = tmp_path / "out" / corpus
    result = invoke("download", corpus, "--out", out, "--params", params)
    assert_one_line_error(result, corpus, hub["repo"], "corpora.source: mirror")
    assert files_under(tmp_path / "out") == []


def test_the_mirror_command_writes_a_mirror_that_download_reads(tmp_path, repo_root, hf_cache):
    repo = tmp_path / "hub" / "daily_dialog"
    repo.mkdir(parents=True)
    pq.write_table(daily_dialog_table(DAILY_DIALOG_ROWS[:2]), repo / "train.parquet")
    pq.write_table(daily_dialog_table(DAILY_DIALOG_ROWS[2:]), repo / "test.parquet")
    mic_rows = sample_mic_rows(repo_root)
    mic_repo = write_mic_zip(tmp_path / "hub" / "mic", mic_rows["train"] + mic_rows["validation"]).parent
    params = write_params(tmp_path, hub={"daily_dialog": {"repo": str(repo), "revision": "main"},
                                         "mic": {"repo": str(mic_repo), "revision": "main", "file": "MIC.zip"}})
    mirror = tmp_path / "mirror"

    result = invoke("mirror", "--out", mirror, "--corpus", "daily_dialog", "--corpus", "mic", "--params", params)

    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*.parquet")) == [
        "daily_dialog/test.parquet", "daily_dialog/train.parquet", "mic/train.parquet", "mic/validation.parquet"]
    stats = json.loads((mirror / "mic" / "stats.json").read_text())
    assert stats["location"] == str(mic_repo) and stats["revision"] == "main"
    # The mirror is what `corpora.source: mirror` reads.
    config = CorporaConfig(source="mirror", mirror=str(mirror))
    download.run(config, "daily_dialog", tmp_path / "raw" / "daily_dialog")
    assert pq.read_table(tmp_path / "raw" / "daily_dialog" / "test.parquet").to_pylist() == DAILY_DIALOG_ROWS[2:]
    download.run(config, "mic", tmp_path / "raw" / "mic")
    written = pq.read_table(tmp_path / "raw" / "mic" / "validation.parquet")
    assert written.column("Q").to_pylist() == [row["Q"] for row in mic_rows["validation"]]


def test_the_mirror_command_rejects_an_unknown_corpus(tmp_path):
    result = invoke("mirror", "--out", tmp_path / "mirror", "--corpus", "dailydialog")
    assert_one_line_error(result, "'dailydialog'", "daily_dialog")
    assert not (tmp_path / "mirror").exists()


# --- bad input: one line, exit status 2, no output ----------------------------------------------------


def good_parquet_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(daily_dialog_table(), sink)
    return sink.getvalue()


def non_utf8_table() -> pa.Table:
    # Arrow checks UTF-8 when casting, not when viewing binary data as strings.
    utterances = pa.array([b"Hi there .", b"caf\xe9 \xff ."], pa.binary()).view(pa.string())
    dialog = pa.ListArray.from_arrays(pa.array([0, 2], pa.int32()), utterances)
    return pa.table({"dialog": dialog, "act": pa.array([[1, 2]]), "emotion": pa.array([[0, 0]])})


def bad_file(kind: str) -> bytes | pa.Table:
    if kind == "empty file":
        return b""
    if kind == "truncated":
        data = good_parquet_bytes()
        return data[: len(data) // 2]
    if kind == "wrong column type":
        return pa.table({"dialog": ["Hi . Hello ."], "act": [[1, 2]], "emotion": [[0, 0]]})
    if kind == "missing column":
        return pa.table({"act": [[1, 2]], "emotion": [[0, 0]]})
    if kind == "non-UTF-8":
        return non_utf8_table()
    if kind == "no rows":
        return daily_dialog_table([])
    raise ValueError(kind)


@pytest.mark.parametrize("kind, parts", [
    ("empty file", ["train.parquet", "not a readable Parquet file"]),
    ("truncated", ["train.parquet", "not a readable Parquet file"]),
    ("wrong column type", ["train.parquet", "column 'dialog'", "expected list<"]),
    ("missing column", ["train.parquet", "missing column 'dialog'"]),
    ("non-UTF-8", ["train.parquet", "UTF8"]),
    ("no rows", ["daily_dialog/train", "no rows"]),
])
def test_a_bad_mirror_file_is_one_line_and_leaves_no_output(tmp_path, kind, parts):
    mirror = tmp_path / "mirror"
    (mirror / "daily_dialog").mkdir(parents=True)
    content = bad_file(kind)
    if isinstance(content, bytes):
        (mirror / "daily_dialog" / "train.parquet").write_bytes(content)
    else:
        pq.write_table(content, mirror / "daily_dialog" / "train.parquet")
    params = write_params(tmp_path, source="mirror", mirror=str(mirror))

    result = invoke("download", "daily_dialog", "--out", tmp_path / "out" / "daily_dialog", "--params", params)

    message = assert_one_line_error(result, *parts)
    if kind != "no rows":
        assert str(mirror / "daily_dialog" / "train.parquet") in message
    assert files_under(tmp_path / "out") == []


def test_a_failed_download_keeps_the_previous_output(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "daily_dialog").mkdir(parents=True)
    pq.write_table(daily_dialog_table(), mirror / "daily_dialog" / "train.parquet")
    params = write_params(tmp_path, source="mirror", mirror=str(mirror))
    out = tmp_path / "out" / "daily_dialog"
    assert invoke("download", "daily_dialog", "--out", out, "--params", params).exit_code == 0
    before = {p: p.read_bytes() for p in files_under(tmp_path / "out") if p.is_file()}
    assert sorted(p.name for p in before) == ["stats.json", "train.parquet"]

    (mirror / "daily_dialog" / "train.parquet").write_bytes(bad_file("truncated"))
    result = invoke("download", "daily_dialog", "--out", out, "--params", params)

    assert_one_line_error(result, "train.parquet")
    assert {p: p.read_bytes() for p in files_under(tmp_path / "out") if p.is_file()} == before
    assert files_under(tmp_path / "out") == [out, *sorted(before)]  # no leftover temporary folder


def test_an_unknown_corpus_name(tmp_path, repo_root):
    params = write_params(tmp_path, sample=str(repo_root / "data" / "sample"))
    result = invoke("download", "daily_dailog", "--out", tmp_path / "out" / "x", "--params", params)
    assert_one_line_error(result, "unknown corpus 'daily_dailog'", "daily_dialog")
    assert files_under(tmp_path / "out") == []


def test_a_corpus_missing_from_the_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "daily_dialog").mkdir(parents=True)
    pq.write_table(daily_dialog_table(), mirror / "daily_dialog" / "train.parquet")
    params = write_params(tmp_path, source="mirror", mirror=str(mirror))
    result = invoke("download", "persona_chat", "--out", tmp_path / "out" / "persona_chat", "--params", params)
    assert_one_line_error(result, str(mirror / "persona_chat"), "corpora.overrides.persona_chat")
    assert files_under(tmp_path / "out") == []


def test_a_missing_mirror_folder(tmp_path):
    params = write_params(tmp_path, source="mirror", mirror=str(tmp_path / "nowhere"))
    result = invoke("download", "daily_dialog", "--out", tmp_path / "out" / "daily_dialog", "--params", params)
    assert_one_line_error(result, str(tmp_path / "nowhere"), "corpora.mirror")
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize("content, parts", [
    (b'{"dialog": ["Hi .", "caf\xe9 ."], "act": [1, 2], "emotion": [0, 0]}\n', ["not valid UTF-8"]),
    (b'{"dialog": ["Hi .", "Yes ."], "act": [1, 2], "emotion": [0, 0]}\n{"dialog": [\n', [":2:", "not valid JSON"]),
    (b'{"dialog": ["Hi .", "Yes ."], "act": [1, 2]}\n', [":1:", "missing ['emotion']"]),
    (b'{"dialog": "Hi . Yes .", "act": [1, 2], "emotion": [0, 0]}\n', [":1:", "'dialog' = 'Hi . Yes .'", "does not fit list<"]),
    (b'{"dialog": ["Hi .", "Yes ."], "act": [1, 2], "emotion": [0, "sad"]}\n', ["do not fit the daily_dialog row"]),
])
def test_a_bad_sample_file(tmp_path, content, parts):
    sample = tmp_path / "sample"
    (sample / "daily_dialog").mkdir(parents=True)
    (sample / "daily_dialog" / "train.jsonl").write_bytes(content)
    params = write_params(tmp_path, source="sample", sample=str(sample))
    result = invoke("download", "daily_dialog", "--out", tmp_path / "out" / "daily_dialog", "--params", params)
    assert_one_line_error(result, sample / "daily_dialog" / "train.jsonl", *parts)
    assert files_under(tmp_path / "out") == []


def test_an_unknown_source_is_a_config_error(tmp_path):
    params = write_params(tmp_path, source="s3")
    result = invoke("download", "daily_dialog", "--out", tmp_path / "out" / "daily_dialog", "--params", params)
    assert_one_line_error(result, str(params), "corpora.source = 's3'", "'mirror'")
    assert files_under(tmp_path / "out") == []


def test_a_missing_params_file(tmp_path):
    result = invoke("download", "daily_dialog", "--out", tmp_path / "out", "--params", tmp_path / "nope.yaml")
    assert_one_line_error(result, tmp_path / "nope.yaml", "not found")
