"""The documentation says only what the code does: README.md, every page of docs/ and bench/README.md.

Each page is checked for
- commands: every `python -m pipeline <command>` (or `-m pipeline <command>` after a launcher; a
  command's subcommand too, `experiment run`) is a command whose `--help` answers, every `--option` written after it is one of its options, and a
  command written with options and without `...` gives every required one (not those an environment
  variable can supply: `audit --name` comes from DVC_STAGE; not with `--help`);
  every `python -m bench <name>` / `python -m bench.<module>` names a benchmark in bench/;
- make targets: every `make <target>` at the start of a command (inline code, or a shell block) is a
  target of the Makefile;
- parameters: every parameter key written in code as `section.key` (inline, `-S section.key=...`, or
  the keys of a YAML block of `params.yaml` sections) exists in the config dataclasses of
  pipeline/config.py, nested keys included; `<name>` stands for any entry of a mapping
  (`corpora.hub.<corpus>.revision`) or any section matching it (`train_stage<k>.epochs`);
- code references: every `pipeline/...py`, `tests/...py` or `bench/...py` path exists, every
  `pipeline.<module>.<name>` / `<module>.<name>` of a top-level pipeline module (`schemas.NORMALIZED`)
  and every `from pipeline... import ...` in a Python block resolves;
- links: every relative link resolves (the file, and its `#anchor` among the target page's headings);
- the stage table (the table whose first column is `stage`) lists exactly the stages of dvc.yaml: a
  plain stage by its name, a `foreach` stage as `<name>@<placeholder>` (`generate@<model>`), each once;
- inline code: no span breaks across lines, so that every span is seen by the checks above.

Each checker returns the problems it found as lines; the tests on synthetic text below show that each
one finds what it should.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import typing
from functools import lru_cache
from pathlib import Path

import pytest
import typer
import yaml
from typer.core import TyperGroup
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import SECTIONS

REPO = Path(__file__).resolve().parents[1]


def doc_pages() -> list[Path]:
    """README.md, docs/**/*.md and bench/README.md, those that exist."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md")), REPO / "bench" / "README.md"]
    return [page for page in pages if page.is_file()]


# --- reading markdown -----------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)\s*(\w*)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")


@dataclasses.dataclass
class Page:
    """A markdown page split into its fenced code blocks (language, text) and its prose lines."""

    blocks: list[tuple[str, str]]
    prose: list[str]

    @classmethod
    def parse(cls, text: str) -> "Page":
        blocks, prose, block, language, fence = [], [], None, "", ""
        for line in text.splitlines():
            opening = FENCE.match(line)
            if block is None and opening:
                block, fence, language = [], opening.group(1), opening.group(2)
            elif block is not None and line.strip().startswith(fence):
                blocks.append((language, "\n".join(block)))
                block = None
            elif block is not None:
                block.append(line)
            else:
                prose.append(line)
        return cls(blocks, prose)

    def inline_code(self) -> list[str]:
        """Every inline code span of the prose (tables included)."""
        return [span for line in self.prose for span in INLINE_CODE.findall(line)]

    def code_lines(self) -> list[str]:
        """Every line of the fenced blocks, a shell line continued by `\\` joined into one."""
        lines = []
        for _, text in self.blocks:
            for line in text.replace("\\\n", " ").splitlines():
                lines.append(line)
        return lines

    def code(self) -> list[str]:
        """Inline spans and fenced lines: everything written as code."""
        return self.inline_code() + self.code_lines()

    def shell(self) -> list[str]:
        """Shell commands: inline spans, and the lines of fenced blocks marked as shell or unmarked."""
        return self.inline_code() + [line for language, text in self.blocks if language in SHELL
                                     for line in text.replace("\\\n", " ").splitlines()]


SHELL = ("", "bash", "sh", "shell", "console")


# --- commands -------------------------------------------------------------------------------------

PIPELINE_COMMAND = re.compile(r"-m pipeline((?:\s+-{1,2}[a-z][\w-]*)*)\s+([a-z][a-z0-9_-]*)(.*)")
COMMAND_END = re.compile(r"\s(?:&&|\|\||;|\||#)\s|`")
OPTION = re.compile(r"(?:^|\s)(--?[a-z][\w-]*)")
BENCH_COMMAND = re.compile(r"-m bench(?:\.(\w+)|((?:\s+[a-z]\w*)*))")


def cli_command(path: tuple[str, ...]):
    """The command of `python -m pipeline <path...>` (`("train",)`, `("experiment", "run")`), or None."""
    command = typer.main.get_command(app)
    for name in path:
        if not isinstance(command, TyperGroup) or name not in command.commands:
            return None
        command = command.commands[name]
    return command


@lru_cache(maxsize=None)
def command_options(path: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """The options of `python -m pipeline <path...>` and the required ones (as their first name), or
    None when there is no such command or its `--help` does not answer."""
    command = cli_command(path)
    if command is None or CliRunner().invoke(app, [*path, "--help"]).exit_code != 0:
        return None
    options, required = {"--help"}, []
    for parameter in command.params:
        if parameter.param_type_name != "option":
            continue
        options.update(parameter.opts + parameter.secondary_opts)
        if parameter.required and not parameter.envvar:
            required.append(max(parameter.opts, key=len))
    return frozenset(options), tuple(required)


SUBCOMMAND = re.compile(r"^\s+([a-z][a-z0-9_-]*)")


def pipeline_commands(page: Page) -> list[tuple[tuple[str, ...], list[str], bool]]:
    """(command path, options written after it, whether the command is written whole: no `...`) for
    every `-m pipeline <command> [<subcommand>] ...` written as code; a subcommand is read where the
    command is a group of them (`experiment run`)."""
    found = []
    for code in page.code():
        for match in PIPELINE_COMMAND.finditer(code):
            path, rest = (match.group(2),), COMMAND_END.split(match.group(3))[0]
            sub = SUBCOMMAND.match(rest)
            if isinstance(cli_command(path), TyperGroup) and sub:
                path, rest = (*path, sub.group(1)), rest[sub.end():]
            found.append((path, OPTION.findall(rest), "..." not in rest))
    return found


def command_problems(page: Page) -> list[str]:
    problems = []
    for path, options, whole in pipeline_commands(page):
        command = " ".join(path)
        answer = command_options(path)
        if answer is None:
            problems.append(f"`python -m pipeline {command}`: no such command")
            continue
        known, required = answer
        problems += [f"`python -m pipeline {command} {option}`: no such option" for option in options
                     if option not in known]
        if options and whole and "--help" not in options:
            problems += [f"`python -m pipeline {command}`: required option {option} is missing"
                         for option in required if option not in options]
    benchmarks = {path.stem for path in (REPO / "bench").glob("*.py")}
    for code in page.code():
        for match in BENCH_COMMAND.finditer(code):
            module, names = match.group(1), (match.group(2) or "").split()
            for name in [module] if module else names:
                if name not in benchmarks and f"bench_{name}" not in benchmarks:
                    problems.append(f"`python -m bench {name}`: no such benchmark in bench/")
    return problems


# --- make targets ---------------------------------------------------------------------------------

MAKE_COMMAND = re.compile(r"(?:^|&&|\|\||;|\()\s*make\s+([a-z][\w-]*)")  # make at a command's start


def makefile_targets(makefile: Path) -> set[str]:
    """The targets of a Makefile: the names before `:` of its rules (not `:=` assignments)."""
    return {match.group(1) for match in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile.read_text(), re.M)}


def make_problems(page: Page, targets: set[str]) -> list[str]:
    return [f"`make {target}`: no such Makefile target" for code in page.shell()
            for target in MAKE_COMMAND.findall(code) if target not in targets]


# --- parameter keys -------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"<[^<>]+>")
KEY = r"[A-Za-z_<][\w<>-]*"
FILE_SUFFIXES = {"json", "jsonl", "py", "parquet", "yaml", "yml", "md", "csv", "png", "npz", "txt", "lock", "zip"}
SET_OPTION = re.compile(rf"-S\s+['\"]?({KEY}(?:\.{KEY})+)\s*=")
# A dotted name that starts with a section is read as a parameter key (also before "(": write a
# function of a stage module as `pipeline.stages.<stage>.<function>`).
LEADING_KEY = re.compile(rf"^({KEY}(?:\.{KEY})+)(?=$|\s|[:=<>!(])")


def section_names(pattern: str) -> list[str]:
    """The sections a written section name stands for: itself, or those its `<...>` placeholders match."""
    if not PLACEHOLDER.search(pattern):
        return [pattern] if pattern in SECTIONS else []
    regex = ".+".join(re.escape(part) for part in PLACEHOLDER.split(pattern))
    return [name for name in SECTIONS if re.fullmatch(regex, name)]


def resolve_key(hint, parts: list[str]) -> bool:
    """Whether the key `parts` exists below a field of type `hint` (a dataclass, a mapping, ...)."""
    if not parts:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(resolve_key(arg, parts) for arg in args if arg is not type(None))
    if dataclasses.is_dataclass(hint):
        fields = typing.get_type_hints(hint)
        names = {field.name for field in dataclasses.fields(hint)}
        return parts[0] in names and resolve_key(fields[parts[0]], parts[1:])
    if origin is dict:  # any entry name (or a placeholder for one), then the entry's own keys
        return resolve_key(args[1], parts[1:])
    return False


def key_exists(key: str) -> bool:
    """Whether `section.key[.key...]` names a parameter of the config dataclasses."""
    section, *parts = key.split(".")
    sections = section_names(section)
    return bool(sections) and all(resolve_key(SECTIONS[name], parts) for name in sections)


def is_section_key(text: str) -> bool:
    """Whether dotted `text` is meant as a parameter key: it starts with a section and is no file name."""
    section, *_, last = text.split(".")
    return bool(section_names(section)) and last not in FILE_SUFFIXES


def yaml_keys(data, prefix: str = "") -> list[str]:
    """The dotted key of every mapping entry in `data` (its leaves and the mappings above them)."""
    keys = []
    for name, value in data.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict):
            keys += yaml_keys(value, key + ".")
    return keys


def parameter_keys(page: Page) -> list[str]:
    """Every parameter key the page writes as code."""
    keys = []
    for span in page.inline_code():
        leading = LEADING_KEY.match(span)
        if leading and is_section_key(leading.group(1)):
            keys.append(leading.group(1))
    for code in page.code():
        keys += SET_OPTION.findall(code)
    for language, text in page.blocks:
        if language in ("yaml", "yml"):
            data = yaml.safe_load(text)
            if isinstance(data, dict) and data and set(data) <= set(SECTIONS):
                keys += [key for key in yaml_keys(data) if "." in key]
    return keys


def parameter_problems(page: Page) -> list[str]:
    return [f"`{key}`: no such parameter in pipeline/config.py" for key in parameter_keys(page)
            if not key_exists(key)]


# --- code references ------------------------------------------------------------------------------

CODE_PATH = re.compile(r"^((?:pipeline|tests|bench)/[\w/.-]+\.py)(?::\s*(\w+))?$")
DOTTED = re.compile(r"^([a-z_]\w*(?:\.\w+)+)(?:\(.*\))?$")
FROM_IMPORT = re.compile(r"^\s*from\s+(pipeline[\w.]*)\s+import\s+([\w\s,()]+?)(?:#.*)?$", re.M)
TOP_MODULES = {path.stem for path in (REPO / "pipeline").glob("*.py") if not path.stem.startswith("_")}


def resolves(module: str, names: list[str]) -> bool:
    """Whether `names` is an attribute path inside the importable module `module`."""
    try:
        target = importlib.import_module(module)
    except ImportError:
        return False
    for name in names:
        if not hasattr(target, name):
            return False
        target = getattr(target, name)
    return True


def dotted_resolves(dotted: str) -> bool:
    """Whether `pipeline.a.b.name` (the longest importable module prefix, then attributes) exists."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        if is_project_module(parts[:cut]):
            return resolves(".".join(parts[:cut]), parts[cut:])
    return False


def is_project_module(parts: list[str]) -> bool:
    """Whether `parts` (`["pipeline", "stages", "mine"]`) is a module or package of the repository."""
    path = REPO
    for part in parts[:-1]:
        path = path / part
        if not (path / "__init__.py").is_file():
            return False
    last = path / parts[-1]
    return last.with_suffix(".py").is_file() or (last / "__init__.py").is_file()


def reference_problems(page: Page) -> list[str]:
    problems = []
    for span in page.inline_code():
        path = CODE_PATH.match(span)
        if path:
            if not (REPO / path.group(1)).is_file():
                problems.append(f"`{span}`: no such file")
            elif path.group(2):
                module = path.group(1).removesuffix(".py").replace("/", ".")
                if not resolves(module, [path.group(2)]):
                    problems.append(f"`{span}`: {path.group(2)} is not defined there")
            continue
        dotted = DOTTED.match(span)
        if not dotted or is_section_key(dotted.group(1)) or dotted.group(1).split(".")[-1] in FILE_SUFFIXES:
            continue
        name = dotted.group(1)
        if name.startswith("pipeline."):
            if not dotted_resolves(name):
                problems.append(f"`{span}`: no such module or name")
        elif name.split(".")[0] in TOP_MODULES and not dotted_resolves(f"pipeline.{name}"):
            problems.append(f"`{span}`: no such name in pipeline/{name.split('.')[0]}.py")
    for language, text in page.blocks:
        if language == "python":
            for module, names in FROM_IMPORT.findall(text):
                for name in re.findall(r"\w+", names):
                    if not resolves(module, [name]):
                        problems.append(f"`from {module} import {name}`: does not resolve")
    return problems


# --- links ----------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown page (lower case, punctuation dropped, spaces
    to hyphens, a repeated heading numbered -1, -2, ...)."""
    anchors, seen = set(), {}
    for line in Page.parse(text).prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_problems(page: Page, text: str, where: Path) -> list[str]:
    problems = []
    for line in page.prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            file = (where.parent / path).resolve() if path else where
            if not file.exists():
                problems.append(f"link ({target}): {path} does not exist")
            elif anchor and file.suffix == ".md":
                source = text if file == where else file.read_text(encoding="utf-8")
                if anchor not in heading_anchors(source):
                    problems.append(f"link ({target}): no heading #{anchor} in {file.name}")
    return problems


# --- the stage table ------------------------------------------------------------------------------


def dvc_stages(dvc_yaml: Path) -> dict[str, bool]:
    """Each stage of dvc.yaml: whether it is a foreach (templated) stage."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    return {name: "foreach" in stage for name, stage in stages.items()}


def stage_tables(page: Page) -> list[list[str]]:
    """The code spans of the first column of each table whose first column is `stage`."""
    tables, rows = [], None
    for line in page.prose + [""]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            if rows is not None:
                tables.append(rows)
            rows = None
        elif rows is None:
            rows = [] if cells[0] == "stage" else None
        elif not set(cells[0]) <= set("-: "):
            rows += INLINE_CODE.findall(cells[0])
    return tables


def stage_table_problems(names: list[str], stages: dict[str, bool]) -> list[str]:
    """Differences between the names of a stage table and the stages of dvc.yaml."""
    problems, listed = [], []
    for name in names:
        stage, at, item = name.partition("@")
        listed.append(stage)
        if stage not in stages:
            problems.append(f"`{name}`: no such stage in dvc.yaml")
        elif stages[stage] and not (at and PLACEHOLDER.fullmatch(item)):
            problems.append(f"`{name}`: a foreach stage, list it as `{stage}@<...>`")
        elif not stages[stage] and at:
            problems.append(f"`{name}`: not a foreach stage, list it as `{stage}`")
    problems += [f"`{stage}` is listed {listed.count(stage)} times" for stage in sorted(set(listed))
                 if listed.count(stage) > 1]
    problems += [f"`{stage}` (dvc.yaml) is missing from the stage table" for stage in stages if stage not in listed]
    return problems


# --- inline code stays on one line ---------------------------------------------------------------


def broken_spans(page: Page) -> list[str]:
    """Prose lines with an odd number of backticks: an inline code span that breaks across lines."""
    return [f"a code span breaks at the end of: {line.strip()}" for line in page.prose if line.count("`") % 2]


# --- the README's shape: length, sections, links to the rest -------------------------------------

README_MAX_LINES = 250  # a README a newcomer reads in five minutes; the rest goes to docs/
# The README's `##` sections, in this order (each the start of a heading).
README_SECTIONS = ("Quick start", "The repository", "The pipeline", "Running and changing one stage",
                   "Corpora", "Headline results", "The paper-scale preset", "Where everything else is",
                   "Licences")
DOCS_TOPICS = ("method", "corpora", "evaluation", "reliability", "design-choices")  # docs/<topic>.md


def headings(page: Page, level: int = 2) -> list[str]:
    """The text of the page's headings of one level, in order."""
    return [line[level:].strip() for line in page.prose if re.match(rf"^#{{{level}}}\s", line)]


def section_order_problems(found: list[str], wanted: tuple[str, ...]) -> list[str]:
    """Whether each wanted section starts one of the `found` headings, the wanted ones in order."""
    problems, positions = [], []
    for name in wanted:
        matches = [index for index, heading in enumerate(found) if heading.startswith(name)]
        if matches:
            positions.append((matches[0], name))
        else:
            problems.append(f"no `## {name}` section")
    problems += [f"`## {later}` comes before `## {earlier}`"
                 for (first, earlier), (second, later) in zip(positions, positions[1:]) if second < first]
    return problems


def section_text(text: str, heading: str) -> str:
    """The text of a page under the `##` heading that starts with `heading`, up to the next `##`."""
    lines, inside, fence = [], False, False
    for line in text.splitlines():
        fence ^= bool(FENCE.match(line))
        if not fence and re.match(r"^##\s", line):
            inside = line[2:].strip().startswith(heading)
        elif inside:
            lines.append(line)
    return "\n".join(lines)


def section(text: str, heading: str) -> Page:
    """The part of a page under the `##` heading that starts with `heading`, up to the next `##`."""
    return Page.parse(section_text(text, heading))


def linked_files(page: Page, where: Path) -> set[Path]:
    """The files the page's relative links point to, anchors dropped."""
    files = set()
    for line in page.prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            path = target.partition("#")[0]
            if path and not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                files.add((where.parent / path).resolve())
    return files


def unlinked_pages(readme: Page, where: Path, pages: list[Path]) -> list[str]:
    """The pages (docs/, bench/README.md) the README does not link to."""
    linked = linked_files(readme, where)
    return [f"{page.relative_to(where.parent)} is not linked from the README" for page in pages
            if page.resolve() not in linked]


# --- the repository tree --------------------------------------------------------------------------

TREE_DRAWING = "│├└─ "


def tree_entries(block: str) -> list[tuple[str, str | None]]:
    """(path, role) of each entry of a `tree` drawing: `├── name/  # <-- role`, four columns per level,
    paths relative to the root `.`; a line naming several folders (`raw/ normalized/`) gives each."""
    entries, parents = [], {}
    for line in block.splitlines():
        if not line.strip() or line.strip() == ".":
            continue
        body = line.lstrip(TREE_DRAWING)
        depth = (len(line) - len(body)) // 4
        names_part, _, comment = body.partition("#")
        role = comment.removeprefix(" <--").strip() if comment.startswith(" <--") else None
        names = names_part.split()
        prefix = parents.get(depth - 1, "")
        for name in names:
            entries.append((prefix + name.rstrip("/"), role))
        if len(names) == 1 and names[0].endswith("/"):
            parents[depth] = prefix + names[0]
    return entries


def dvc_output_paths(dvc_yaml: Path) -> list[list[str]]:
    """Every output of dvc.yaml (outs, metrics, plots) as path components; `${...}` stays as written."""
    paths = []
    for stage in yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"].values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for out in body.get(kind, []):
                paths.append(str(next(iter(out)) if isinstance(out, dict) else out).split("/"))
    return paths


def is_dvc_output(path: str, outputs: list[list[str]]) -> bool:
    """Whether `path` is a DVC output, a folder above one or a file inside one (`${...}`: any name)."""
    parts = path.split("/")

    def same(written: str, actual: str) -> bool:
        return re.fullmatch(re.sub(r"\\\$\\\{[^}]*\\\}", "[^/]+", re.escape(written)), actual) is not None

    return any(all(same(written, actual) for written, actual in zip(out, parts)) for out in outputs)


def tree_problems(entries: list[tuple[str, str | None]], repo: Path, outputs: list[list[str]],
                  required: set[str]) -> list[str]:
    """An entry without a `# <--` role, one that neither exists nor is a DVC output, and a required
    path (a top-level entry of the repository, a pipeline module) missing from the tree."""
    problems = [f"`{path}` has no `# <--` role" for path, role in entries if not role]
    problems += [f"`{path}` does not exist and is no DVC output" for path, _ in entries
                 if not (repo / path).exists() and not is_dvc_output(path, outputs)]
    listed = {path for path, _ in entries}
    problems += [f"`{path}` is missing from the tree" for path in sorted(required - listed)]
    return problems


def required_tree_paths(repo: Path) -> set[str]:
    """What the tree must show: the top-level files and folders git tracks (not hidden ones) and every
    module of pipeline/."""
    modules = {f"pipeline/{path.name}" for path in (repo / "pipeline").glob("*.py") if not path.name.startswith("_")}
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # no git (an unpacked archive): the modules only
        return modules
    top = {line.split("/")[0] for line in tracked.splitlines() if line and not line.startswith(".")}
    return modules | top


def readme_tree(text: str) -> list[tuple[str, str | None]]:
    """The entries of the first fenced block under the README's `## The repository`."""
    blocks = section(text, "The repository").blocks
    return tree_entries(blocks[0][1]) if blocks else []


# --- headline figures come with their command and commit -------------------------------------------

COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
COMMAND = re.compile(r"^\s*(?:[A-Z_]+=\S+\s+)*(?:dvc|make|python)\s")


def commit_exists(commit: str, repo: Path) -> bool:
    """Whether git knows `commit`; True where there is no git to ask (an unpacked archive)."""
    try:
        return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo,
                              capture_output=True).returncode == 0
    except OSError:
        return True


def headline_problems(text: str, repo: Path) -> list[str]:
    """In each part of the headline results (the section, or each of its `###` subsections) that holds
    a table: a command (`dvc ...`, `make ...`, `python ...` as code) and a commit (a code span of 7-40
    hex digits) that git knows."""
    part_texts, current, fence = [], [], False
    for line in section_text(text, "Headline results").splitlines() + ["### end"]:
        fence ^= bool(FENCE.match(line))
        if not fence and line.startswith("### "):
            part_texts.append("\n".join(current))
            current = []
        else:
            current.append(line)
    problems = []
    for number, part_text in enumerate(part_texts):
        part = Page.parse(part_text)
        if not any(line.lstrip().startswith("|") for line in part.prose):
            continue
        where = f"headline results, part {number + 1}"
        if not any(COMMAND.match(code) for code in part.shell()):
            problems.append(f"{where}: a table without the command that produced it")
        commits = [span for span in part.inline_code() if COMMIT.match(span)]
        if not commits:
            problems.append(f"{where}: a table without the commit that produced it")
        problems += [f"{where}: commit `{commit}` is not in this repository" for commit in commits
                     if not commit_exists(commit, repo)]
    return problems


# --- the real pages -------------------------------------------------------------------------------

PAGES = doc_pages()
IDS = [str(page.relative_to(REPO)) for page in PAGES]


def read(page: Path) -> tuple[Page, str]:
    text = page.read_text(encoding="utf-8")
    return Page.parse(text), text


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_every_command_named_exists(path):
    assert command_problems(read(path)[0]) == []


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_every_make_target_named_exists(path):
    assert make_problems(read(path)[0], makefile_targets(REPO / "Makefile")) == []


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_every_parameter_key_named_exists(path):
    assert parameter_problems(read(path)[0]) == []


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_every_code_reference_resolves(path):
    assert reference_problems(read(path)[0]) == []


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_every_relative_link_resolves(path):
    page, text = read(path)
    assert link_problems(page, text, path) == []


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_no_code_span_breaks_across_lines(path):
    assert broken_spans(read(path)[0]) == []


def test_the_readme_stage_table_lists_exactly_the_dvc_stages():
    tables = stage_tables(read(REPO / "README.md")[0])
    assert len(tables) == 1, "README.md needs one table whose first column is `stage`"
    assert stage_table_problems(tables[0], dvc_stages(REPO / "dvc.yaml")) == []


def test_any_other_stage_table_lists_exactly_the_dvc_stages():
    for path in PAGES[1:]:
        for names in stage_tables(read(path)[0]):
            assert stage_table_problems(names, dvc_stages(REPO / "dvc.yaml")) == [], path


def test_the_pages_checked_include_the_readme():
    assert REPO / "README.md" in PAGES


def test_the_readme_fits_in_a_five_minute_read():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_the_readme_sections_come_in_the_order_a_newcomer_needs_them():
    assert section_order_problems(headings(read(REPO / "README.md")[0]), README_SECTIONS) == []


def test_the_readme_links_every_page_of_docs_and_the_benchmarks():
    topics = [REPO / "docs" / f"{topic}.md" for topic in DOCS_TOPICS]
    assert [page for page in topics if not page.is_file()] == []
    assert unlinked_pages(read(REPO / "README.md")[0], REPO / "README.md", PAGES[1:]) == []


def test_the_readme_tree_shows_the_repository_with_a_role_per_entry():
    entries = readme_tree(read(REPO / "README.md")[1])
    assert entries, "README.md needs a tree under `## The repository`"
    assert tree_problems(entries, REPO, dvc_output_paths(REPO / "dvc.yaml"), required_tree_paths(REPO)) == []


def test_headline_figures_come_with_their_command_and_commit():
    assert headline_problems(read(REPO / "README.md")[1], REPO) == []


# --- each checker finds what it should, on synthetic text -----------------------------------------

SYNTHETIC = '''# Title

## Design choices (ours)

Run `python -m pipeline normalize mic --raw data/raw/mic --out x` or `python -m pipeline nosuch --x`,
`python -m pipeline normalize mic --raw r` (no --out), `python -m pipeline normalize mic --raw r ...`,
`python -m pipeline audit --safety s --normalized n --candidates c` (--name from DVC_STAGE),
`python -m pipeline safety --help`, `python -m pipeline experiment run --plan headline`,
`python -m pipeline experiment nosuch --plan x`, `python -m pipeline experiment report --bogus`, and
`python -m pipeline score` alone.

```bash
python -m pipeline train --stage 1 --init models/base \\
    --groups g --out o --bogus-option 3   # a comment --not-an-option
accelerate launch --num_processes 4 -m pipeline train --stage 1 ...
make repro && make nosuch-target
# make a branch of it (a comment, not a command)
dvc exp run -S train.contrastive_weight=0 -S 'corpora.overrides={mic: sample}' -S train.no_such_key=1
python -m bench bench_mine nosuch_bench
```

Keys: `generate.gamma`, `safety.tfidf.C`, `train_stage<k>.epochs`, `corpora.hub.<corpus>.revision`,
`audit.models.<name>.trust_remote_code`, `train.processes > 1`, `mine.n < 2`, `train.json` (a file),
`generate.no_such_key`, `safety.tfidf.D`, `train_stage<k>.no_such_key`, `nosection.key`.
`make test`, and `make`-free prose: make sure.

```text
target: <|response|> Did you make it on time?
```

```yaml
audit:
  models:
    dialogpt: {path: microsoft/DialoGPT-medium, revision: main, no_such_field: 1}
```

Code: `pipeline/scoring.py`, `pipeline/nosuch.py`, `pipeline/schemas.py: NORMALIZED`,
`pipeline/schemas.py: NO_SUCH`, `schemas.read_table`, `schemas.no_such_reader`,
`pipeline.modeling.load_dialog_model`, `pipeline.modeling.no_such_function`, `train.score_groups(model)`.

```python
from pipeline.labels import THREE_WAY, NO_SUCH_LABELS
```

Links: [ok](#design-choices-ours), [bad anchor](#no-such-heading), [file](dvc.yaml),
[missing](docs/no_such_page.md), [web](https://dvc.org), `[not a link](nowhere.md)`.

| stage | writes |
|---|---|
| `download@<corpus>`, `normalize@<corpus>` | raw, normalized |
| `safety` | models/safety |
| `mine@<stage>` | groups |
| `generate` | candidates |
| `safety` | again |
'''


@pytest.fixture(scope="module")
def synthetic() -> Page:
    return Page.parse(SYNTHETIC)


def test_commands_checker_finds_unknown_commands_and_options(synthetic):
    assert command_problems(synthetic) == [
        "`python -m pipeline nosuch`: no such command",
        "`python -m pipeline normalize`: required option --out is missing",
        "`python -m pipeline experiment nosuch`: no such command",
        "`python -m pipeline experiment report --bogus`: no such option",
        "`python -m pipeline train --bogus-option`: no such option",
        "`python -m bench nosuch_bench`: no such benchmark in bench/",
    ]


def test_make_checker_finds_unknown_targets(synthetic):
    assert make_problems(synthetic, {"repro", "test"}) == ["`make nosuch-target`: no such Makefile target"]
    assert makefile_targets(REPO / "Makefile") >= {"install", "repro", "test", "test-slow", "paper", "bench"}


def test_parameter_checker_finds_unknown_keys(synthetic):
    assert sorted(parameter_problems(synthetic)) == sorted([
        "`generate.no_such_key`: no such parameter in pipeline/config.py",
        "`safety.tfidf.D`: no such parameter in pipeline/config.py",
        "`train_stage<k>.no_such_key`: no such parameter in pipeline/config.py",
        "`train.score_groups`: no such parameter in pipeline/config.py",
        "`train.no_such_key`: no such parameter in pipeline/config.py",
        "`audit.models.dialogpt.no_such_field`: no such parameter in pipeline/config.py",
    ])
    found = parameter_keys(synthetic)
    for key in ("generate.gamma", "safety.tfidf.C", "train_stage<k>.epochs", "corpora.hub.<corpus>.revision",
                "audit.models.<name>.trust_remote_code", "train.processes", "mine.n",
                "train.contrastive_weight", "corpora.overrides", "audit.models.dialogpt.path"):
        assert key in found and key_exists(key), key
    assert "train.json" not in found and "nosection.key" not in found


def test_reference_checker_finds_missing_files_and_names(synthetic):
    assert reference_problems(synthetic) == [
        "`pipeline/nosuch.py`: no such file",
        "`pipeline/schemas.py: NO_SUCH`: NO_SUCH is not defined there",
        "`schemas.no_such_reader`: no such name in pipeline/schemas.py",
        "`pipeline.modeling.no_such_function`: no such module or name",
        "`from pipeline.labels import NO_SUCH_LABELS`: does not resolve",
    ]


def test_link_checker_finds_broken_links_and_anchors(synthetic, tmp_path):
    where = tmp_path / "page.md"
    where.write_text(SYNTHETIC)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert link_problems(synthetic, SYNTHETIC, where) == [
        "link (#no-such-heading): no heading #no-such-heading in page.md",
        "link (docs/no_such_page.md): docs/no_such_page.md does not exist",
    ]
    assert heading_anchors("# A `code` (b)\n## A code b\n```\n# not a heading\n```\n") == {"a-code-b", "a-code-b-1"}


def test_broken_span_checker_finds_a_span_across_lines():
    page = Page.parse("one `generate.gamma` span, one `-S\ngenerate.gamma=0` broken\n```\n`odd\n```\n")
    assert broken_spans(page) == ["a code span breaks at the end of: one `generate.gamma` span, one `-S",
                                  "a code span breaks at the end of: generate.gamma=0` broken"]


def test_stage_table_checker_finds_missing_extra_and_misnamed_stages(synthetic):
    stages = {"download": True, "normalize": True, "safety": False, "mine_stage1": False, "generate": True}
    assert stage_tables(synthetic) == [["download@<corpus>", "normalize@<corpus>", "safety", "mine@<stage>",
                                        "generate", "safety"]]
    assert stage_table_problems(stage_tables(synthetic)[0], stages) == [
        "`mine@<stage>`: no such stage in dvc.yaml",
        "`generate`: a foreach stage, list it as `generate@<...>`",
        "`safety` is listed 2 times",
        "`mine_stage1` (dvc.yaml) is missing from the stage table",
    ]
    assert stage_table_problems(["download@<corpus>", "safety@<x>"], {"download": True, "safety": False}) == [
        "`safety@<x>`: not a foreach stage, list it as `safety`"]


def test_section_order_checker_finds_missing_and_misplaced_sections(synthetic):
    assert headings(synthetic) == ["Design choices (ours)"]
    found = ["Quick start", "The pipeline", "The repository: a tree"]
    assert section_order_problems(found, ("Quick start", "The repository", "The pipeline", "Licences")) == [
        "no `## Licences` section", "`## The pipeline` comes before `## The repository`"]
    assert section_order_problems(found, ("Quick start", "The pipeline")) == []


def test_unlinked_page_checker_finds_a_page_the_readme_does_not_link(tmp_path):
    (tmp_path / "docs").mkdir()
    pages = [tmp_path / "docs" / "method.md", tmp_path / "docs" / "orphan.md", tmp_path / "bench" / "README.md"]
    readme = Page.parse("See [the method](docs/method.md#the-loss), [bench](./bench/README.md) and "
                        "`[not a link](docs/orphan.md)`, [web](https://example.org/docs/orphan.md).\n")
    assert unlinked_pages(readme, tmp_path / "README.md", pages) == ["docs/orphan.md is not linked from the README"]


TREE = """\
.
├── Makefile                 # <-- the commands
├── pipeline/                # <-- the package
│   ├── cli.py               # <-- commands
│   └── stages/              # <-- one module per stage
│       └── mine.py          # <-- mining
├── nosuch.txt               # <-- neither in the repository nor a DVC output
├── data/
│   └── raw/ groups/         # <-- DVC outputs
└── models/                  # <-- DVC outputs
"""


def test_tree_checker_finds_entries_without_a_role_missing_paths_and_unlisted_modules(tmp_path):
    for path in ("Makefile", "pipeline/cli.py", "pipeline/stages/mine.py", "pipeline/losses.py", "data/x"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    entries = tree_entries(TREE)
    assert [path for path, _ in entries] == ["Makefile", "pipeline", "pipeline/cli.py", "pipeline/stages",
                                             "pipeline/stages/mine.py", "nosuch.txt", "data", "data/raw",
                                             "data/groups", "models"]
    assert dict(entries)["pipeline/stages/mine.py"] == "mining" and dict(entries)["data"] is None
    outputs = [["data", "raw", "${item}"], ["data", "groups", "stage1"], ["models", "base"]]
    required = {"Makefile", "pipeline/cli.py", "pipeline/losses.py"}
    assert tree_problems(entries, tmp_path, outputs, required) == [
        "`data` has no `# <--` role",
        "`nosuch.txt` does not exist and is no DVC output",
        "`pipeline/losses.py` is missing from the tree",
    ]


def test_dvc_output_matcher_reads_placeholders_as_any_name():
    outputs = [["data", "raw", "${item}"], ["reports", "scores", "${item}", "eval.json"]]
    assert is_dvc_output("data/raw", outputs) and is_dvc_output("data/raw/mic", outputs)
    assert is_dvc_output("data/raw/mic/train.parquet", outputs)  # a file inside an output
    assert is_dvc_output("reports/scores/stage2/eval.json", outputs)
    assert not is_dvc_output("data/cooked", outputs) and not is_dvc_output("reports/other", outputs)
    real = dvc_output_paths(REPO / "dvc.yaml")
    assert ["models", "base"] in real and ["reports", "metrics.json"] in real  # outs and metrics both read


def test_headline_checker_wants_a_command_and_a_known_commit_beside_each_table():
    def page(body: str) -> str:
        return f"# T\n\n## Headline results\n\n{body}\n## Next\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"

    table = "| metric | value |\n|---|---|\n| unsafe rate | 0.1 |\n"
    assert headline_problems(page("None yet: the experiment will give them.\n"), REPO) == []
    assert headline_problems(page(table), REPO) == [
        "headline results, part 1: a table without the command that produced it",
        "headline results, part 1: a table without the commit that produced it"]
    assert headline_problems(page(f"### The audit\n\n{table}\n`dvc repro audit_report` at `0000000`\n"), REPO) == [
        "headline results, part 2: commit `0000000` is not in this repository"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout with its history
        good = f"### The experiment\n\n```bash\nmake experiment\n```\n\n{table}\nat commit `{head.stdout.strip()}`\n"
        assert headline_problems(page(good), REPO) == []


# --- the experiment's table ---------------------------------------------------------------------------


@pytest.mark.parametrize("folder, table, section, page", [
    ("experiment", "headline_lines", "Headline", "README.md"),  # SmolLM2's
    ("experiment", "replication_lines", "Seeds and ablations, main rows", "README.md"),
    ("experiment", "dexperts_lines", "DExperts by alpha", "docs/experiments.md"),  # the alpha sweep
    ("experiment-scratch", "headline_lines", "Headline", "docs/experiments.md"),  # the scratch model's
])
def test_the_readme_experiment_tables_are_rendered_from_the_committed_results(folder, table, section, page):
    """The experiment's tables in the README (SmolLM2's) and docs/experiments.md (the scratch model's,
    SmolLM2's DExperts sweep) are `experiment.headline_lines`, `replication_lines` and `dexperts_lines`
    of the committed reports/<folder>/results.json, line for line: not typed by hand."""
    import json

    from pipeline import experiment

    path = REPO / "reports" / folder / "results.json"
    if not path.is_file():
        pytest.skip(f"no {path} committed yet")
    lines = getattr(experiment, table)(json.loads(path.read_text(encoding="utf-8")))
    if table in ("replication_lines", "dexperts_lines") and not lines:
        pytest.skip(f"{path}: no {'seeds or ablations' if table == 'replication_lines' else 'alpha sweep'} run yet")
    assert lines, f"{path}: no run of the method to show"
    assert "\n".join(lines) in (REPO / page).read_text(encoding="utf-8"), (
        f"{page}'s experiment table differs from {path}: paste the `## {section}` table of its results.md")
