"""The command line: `python -m pipeline <stage> ...`, one thin command per pipeline stage.

Each command reads its `params.yaml` section once, then hands plain values to the stage module's
`run()`. Stage modules are imported inside the commands, so `--help` stays instant (they pull in
pyarrow, pandas, torch or transformers). A PipelineError becomes one line on stderr and exit
status 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline.config import CORPORA, CorporaConfig, NormalizeConfig, load_section
from pipeline.errors import DataError, reports_errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Socially aware contrastive learning for dialog safety: the stages of the DVC pipeline.",
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="Parameter file to read the stage's section from.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def check_corpus(corpus: str) -> str:
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r} (known: {', '.join(CORPORA)})")
    return corpus


@app.command()
@reports_errors
def download(
    corpus: str = typer.Argument(..., help=f"One of: {', '.join(CORPORA)}."),
    out: Path = typer.Option(..., help="Folder to write <split>.parquet and stats.json into."),
    params: Path = PARAMS,
):
    """Fetch one corpus (bundled sample, local mirror or hub) as raw Parquet in its hub row format."""
    config = load_section(params, "corpora", CorporaConfig)
    from pipeline.stages import download as stage

    stage.run(config, check_corpus(corpus), out)


@app.command()
@reports_errors
def mirror(
    out: Path = typer.Option(..., help="Mirror folder to write <corpus>/<split>.parquet into."),
    corpus: list[str] = typer.Option(list(CORPORA), help="Corpora to fetch (repeat the option); default all."),
    params: Path = PARAMS,
):
    """Download corpora from the Hugging Face hub into a mirror folder for an air-gapped machine."""
    config = load_section(params, "corpora", CorporaConfig)
    from pipeline.stages import download as stage

    stage.write_mirror(config, [check_corpus(c) for c in corpus], out)


@app.command()
@reports_errors
def normalize(
    corpus: str = typer.Argument(..., help=f"One of: {', '.join(CORPORA)}."),
    raw: Path = typer.Option(..., help="Raw corpus folder written by `download`."),
    out: Path = typer.Option(..., help="Folder to write the normalized splits and stats.json into."),
    params: Path = PARAMS,
):
    """Normalize one corpus into the unified turn-level schema (train, validation, test)."""
    config = load_section(params, "normalize", NormalizeConfig)
    from pipeline.stages import normalize as stage

    stage.run(config, check_corpus(corpus), raw, out)
