"""download: fetch one corpus into `data/raw/<corpus>/<split>.parquet` in its Hugging Face row format.

Reads, by `corpora.source` (or `corpora.overrides.<corpus>`):
  sample  `data/sample/<corpus>/<split>.jsonl`, the small corpora bundled with the repository;
  mirror  `<corpora.mirror>/<corpus>/<split>.parquet`, a local copy for air-gapped machines;
  hub     the Hugging Face hub at the revision in `corpora.hub.<corpus>` (MIC: `MIC.csv` in `MIC.zip`;
          ToxiChat, not on the hub: its JSON lines at `data_files` URLs, read by `datasets`' JSON loader).
Writes `data/raw/<corpus>/<split>.parquet` for each split the source has, and `stats.json` (source,
requested revision, resolved commit, rows and SHA-256 per file). The folder is swapped in whole, so an
interrupted run leaves the previous one intact.

    python -m pipeline download prosocial_dialog --out data/raw/prosocial_dialog
    python -m pipeline mirror --out /path/to/mirror   # hub -> mirror folder, for air-gapped machines
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.artifacts import ensure_writable, sha256, staged_dir, write_json, write_parquet
from pipeline.config import CORPORA, SPLITS, CorporaConfig, HubCorpus
from pipeline.errors import DataError
from pipeline.schemas import RAW, conform_raw, read_raw

log = logging.getLogger(__name__)

# Split names that sources use for our three splits.
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}


# --- sample ---------------------------------------------------------------------------------------


def read_sample_split(path: Path, corpus: str) -> pa.Table:
    """Read one bundled JSON Lines file into the corpus's raw Arrow schema."""
    schema = RAW[corpus]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is dropped
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1  # a file in another encoding, or mixed encodings
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {error.start}: "
                        f"{error.object[error.start:error.end]!r}); save the file as UTF-8") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if set(row) != set(schema.names):
            missing, extra = set(schema.names) - set(row), set(row) - set(schema.names)
            raise DataError(f"{path}:{number}: keys differ from the {corpus} row format "
                            f"(missing {sorted(missing)}, unexpected {sorted(extra)})")
        for field in schema:
            if not fits_nesting(row[field.name], field.type):
                raise DataError(f"{path}:{number}: '{field.name}' = {row[field.name]!r:.60} does not fit {field.type}")
        rows.append(row)
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise DataError(f"{path}: rows do not fit the {corpus} row format ({error})") from None


def fits_nesting(value, type_: pa.DataType) -> bool:
    """Whether lists and mappings sit where `type_` has them; Arrow would otherwise turn a string
    given for a list of strings into a list of its characters."""
    if value is None:
        return True
    if pa.types.is_list(type_):
        return isinstance(value, list) and all(fits_nesting(v, type_.value_type) for v in value)
    if pa.types.is_struct(type_):
        return isinstance(value, dict) and all(fits_nesting(value.get(f.name), f.type) for f in type_)
    return not isinstance(value, (list, dict))


def fetch_sample(folder: Path, corpus: str) -> dict[str, pa.Table]:
    """All splits of `corpus` in the bundled sample folder."""
    files = {split: folder / corpus / f"{split}.jsonl" for split in SPLITS}
    tables = {split: read_sample_split(path, corpus) for split, path in files.items() if path.is_file()}
    if not tables:
        raise DataError(f"{folder / corpus}: no sample files (expected {', '.join(SPLITS)} .jsonl)")
    return tables


# --- mirror ---------------------------------------------------------------------------------------


def fetch_mirror(folder: Path, corpus: str) -> dict[str, pa.Table]:
    """All splits of `corpus` in a mirror folder laid out as `<folder>/<corpus>/<split>.parquet`."""
    if not folder.is_dir():
        raise DataError(f"{folder}: mirror folder not found (corpora.mirror)")
    files = {split: folder / corpus / f"{split}.parquet" for split in SPLITS}
    tables = {split: read_raw(path, corpus) for split, path in files.items() if path.is_file()}
    if not tables:
        raise DataError(f"{folder / corpus}: the mirror has no {corpus} files; "
                        f"set corpora.overrides.{corpus} to another source")
    return tables


# --- hub ------------------------------------------------------------------------------------------


def read_mic_zip(path: Path) -> dict[str, pa.Table]:
    """Read `MIC.csv` from MIC's zip archive and split it by its `split` column."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("MIC.csv")), None)
            if name is None:
                raise DataError(f"{path}: archive has no MIC.csv")
            data = archive.read(name)
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a zip archive") from None
    try:
        table = pacsv.read_csv(io.BytesIO(data))
    except pa.ArrowException as error:
        raise DataError(f"{path}: {name} is not a readable CSV ({str(error).splitlines()[0]})") from None
    return split_by_column(table, "split", path)


def split_by_column(table: pa.Table, column: str, where: Path | str) -> dict[str, pa.Table]:
    """Partition a table by a split-name column (dev/valid count as validation)."""
    import pyarrow.compute as pc

    if column not in table.column_names:
        raise DataError(f"{where}: missing column '{column}'")
    tables = {}
    for name in table.column(column).unique().to_pylist():
        split = SPLIT_ALIASES.get(str(name))
        if split is None:
            raise DataError(f"{where}: unknown split name {name!r} in column '{column}'")
        tables[split] = table.filter(pc.equal(table.column(column), name))
    return tables


def fetch_hub(hub: HubCorpus, corpus: str) -> tuple[dict[str, pa.Table], str]:
    """Download every split of `corpus` from the hub; returns the tables and the resolved commit.

    `hub.repo` (or each of `hub.data_files`) may also be a local folder or file, which is how tests
    run this very code offline.
    """
    try:
        if hub.file:
            path = Path(hub.repo) / hub.file
            if not path.exists():
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(hub.repo, hub.file, repo_type="dataset", revision=hub.revision))
            tables = read_mic_zip(path)
        elif hub.data_files:
            tables = read_json_files(data_file_urls(hub), corpus)
        else:
            import datasets

            dataset = datasets.load_dataset(hub.repo, revision=hub.revision)
            tables = {SPLIT_ALIASES[name]: ds.data.table for name, ds in dataset.items() if name in SPLIT_ALIASES}
        commit = resolve_commit(hub)
    except DataError:
        raise
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        where = "its data_files" if hub.data_files else "the Hugging Face hub"
        # `datasets` wraps a file that does not parse in DatasetGenerationError; its cause says why.
        cause = error.__cause__ if type(error).__name__ == "DatasetGenerationError" and error.__cause__ else error
        raise DataError(f"{corpus}: could not download {hub.repo}@{hub.revision} from {where} "
                        f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
                        f"on a machine without network set corpora.source: mirror") from None
    return tables, commit


def data_file_urls(hub: HubCorpus) -> dict[str, str]:
    """`hub.data_files` with `{revision}` replaced by the revision."""
    return {split: url.replace("{revision}", hub.revision) for split, url in hub.data_files.items()}


def read_json_files(urls: dict[str, str], corpus: str) -> dict[str, pa.Table]:
    """Read one JSON(-lines) file per split with `datasets`' JSON loader, parsed as the corpus's raw
    schema: without it, objects whose keys differ between rows (ToxiChat's first turn has no stance
    keys) would arrive as unparsed JSON text."""
    import datasets

    features = datasets.Features.from_arrow_schema(RAW[corpus])
    dataset = datasets.load_dataset("json", data_files=urls, features=features)
    return {split: dataset[split].data.table for split in urls}


def resolve_commit(hub: HubCorpus) -> str:
    """The commit a hub revision points at ('local' for a local folder; for `data_files`, the
    revision as given, so pin a commit there)."""
    if hub.data_files:
        local = all(Path(url).exists() for url in data_file_urls(hub).values())
        return "local" if local else hub.revision
    if Path(hub.repo).exists():
        return "local"
    from huggingface_hub import HfApi

    return HfApi().dataset_info(hub.repo, revision=hub.revision).sha or hub.revision


# --- run ------------------------------------------------------------------------------------------


def fetch(config: CorporaConfig, corpus: str) -> tuple[dict[str, pa.Table], dict]:
    """Fetch every split of `corpus` from its configured source; returns tables and provenance."""
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r} (known: {', '.join(CORPORA)})")
    source = config.source_of(corpus)
    if source == "sample":
        return fetch_sample(Path(config.sample), corpus), {"source": "sample", "location": config.sample}
    if source == "mirror":
        return fetch_mirror(Path(config.mirror), corpus), {"source": "mirror", "location": config.mirror}
    hub = config.hub[corpus]
    tables, commit = fetch_hub(hub, corpus)
    return tables, {"source": "hub", "location": hub.repo, "revision": hub.revision, "commit": commit}


def check_row_format(tables: dict[str, pa.Table], corpus: str, where: str) -> dict[str, pa.Table]:
    """Validate every split against the raw schema (a hub table may carry extra columns); an empty
    split is an error, as it would only fail later in `normalize`."""
    for split, table in tables.items():
        if table.num_rows == 0:
            raise DataError(f"{where} ({corpus}/{split}): the split has no rows")
    return {split: conform_raw(table, corpus, f"{where} ({corpus}/{split})") for split, table in tables.items()}


def write_corpus(tables: dict[str, pa.Table], provenance: dict, corpus: str, out: Path) -> dict:
    """Write the split files and stats.json into `out`, swapping the folder in atomically."""
    with staged_dir(out) as folder:
        files = {}
        for split, table in sorted(tables.items()):
            path = folder / f"{split}.parquet"
            write_parquet(table, path)
            files[split] = {"rows": table.num_rows, "sha256": sha256(path)}
        stats = {"corpus": corpus, **provenance, "files": files}
        write_json(stats, folder / "stats.json")
    return stats


def run(config: CorporaConfig, corpus: str, out: Path) -> dict:
    """Fetch `corpus` from its source and write it to `out`."""
    ensure_writable(out)
    tables, provenance = fetch(config, corpus)
    tables = check_row_format(tables, corpus, provenance["location"])
    stats = write_corpus(tables, provenance, corpus, out)
    rows = ", ".join(f"{s} {f['rows']}" for s, f in stats["files"].items())
    log.info("download %s from %s: %s rows -> %s", corpus, provenance["source"], rows, out)
    return stats


def write_mirror(config: CorporaConfig, corpora: list[str], out: Path) -> None:
    """Download `corpora` from the hub into a mirror folder `<out>/<corpus>/<split>.parquet`."""
    for corpus in corpora:
        if corpus not in config.hub:
            raise DataError(f"corpora.hub has no entry for {corpus}")
        ensure_writable(out / corpus)
        tables, commit = fetch_hub(config.hub[corpus], corpus)
        write_corpus(tables, {"source": "hub", "location": config.hub[corpus].repo,
                              "revision": config.hub[corpus].revision, "commit": commit}, corpus, out / corpus)
        log.info("mirror %s (%s) -> %s", corpus, commit, out / corpus)
