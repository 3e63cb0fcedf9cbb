"""Loading a pretrained Hugging Face checkpoint (a hub id or a local folder) safely, as it is.

Used by the `base_model` stage (which then adds the dialog markers) and by `generate` for the audited
models (which are prompted in their own format and get nothing added).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import DataError

log = logging.getLogger(__name__)


def load_pretrained(name: str, revision: str, trust_remote_code: bool, name_key: str, trust_key: str):
    """Load the checkpoint `name` (hub id or local folder) as float32; returns (model, tokenizer, source).

    Refuses a checkpoint that needs its own code unless `trust_remote_code`; a hub id that cannot be
    reached is a DataError that points to a local folder instead. Every error names the parameter
    `name_key` (e.g. `base_model.name`) or, for remote code, `trust_key`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PretrainedConfig

    trust = trust_remote_code
    local = Path(name).expanduser()
    is_local = local.is_dir()
    if not is_local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise DataError(f"{name_key} = {name!r}: no such local folder")
    where = str(local) if is_local else name
    revision = None if is_local else revision
    try:
        raw, _ = PretrainedConfig.get_config_dict(where, revision=revision)
    except OSError as error:
        if is_local:
            raise DataError(f"{local}: not a model folder ({str(error).splitlines()[0]})") from None
        raise DataError(f"{name_key} = {name!r}: cannot load it from the Hugging Face hub "
                        f"({str(error).splitlines()[0]}); save it with save_pretrained on a machine with "
                        f"network and set {name_key} to that local folder") from None
    if "auto_map" in raw and not trust:
        raise DataError(f"{name_key} = {name!r}: the checkpoint ships its own modelling code (auto_map in "
                        f"config.json); set {trust_key}: true only if you trust it")
    try:
        model_config = AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust)
        is_seq2seq = bool(model_config.is_encoder_decoder)
        loader = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
        # Prefer safetensors; a folder with only PyTorch pickles is read with torch.load(weights_only=True),
        # which refuses any pickled object other than tensors and plain containers.
        use_safetensors = any(local.glob("*.safetensors")) if is_local else None
        if use_safetensors is False:
            log.warning("%s has no .safetensors weights: loading its .bin weights with weights_only=True", local)
        # float32 master weights, whatever precision the checkpoint was stored in.
        model, info = loader.from_pretrained(where, revision=revision, trust_remote_code=trust, dtype=torch.float32,
                                             use_safetensors=use_safetensors, weights_only=True,
                                             output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{name_key} = {name!r}: cannot load it as a causal or sequence-to-sequence "
                        f"language model ({str(error).splitlines()[0]})") from None
    # transformers fills weights the checkpoint lacks with random ones (an encoder-only model gets a
    # fresh LM head); a model with untrained parts is refused rather than used silently.
    missing = sorted(info["missing_keys"])
    if missing:
        raise DataError(f"{name_key} = {name!r}: cannot load it as a causal or sequence-to-sequence "
                        f"language model ({len(missing)} weights missing from the checkpoint, e.g. {missing[0]})")
    source = {"name": name, "local": is_local, "revision": revision, "model_type": model_config.model_type}
    return model, tokenizer, source
