"""Loading a pretrained Hugging Face checkpoint (a hub id or a local folder) safely, as it is.

Used by the `base_model` stage (which then adds the dialog markers) and by `generate` for the audited
models (which are prompted in their own format and get nothing added; their tokenizer is checked
before the weights are read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A checkpoint whose config and tokenizer are read and checked, before any weights are."""

    name: str
    where: str  # the local folder or the hub id
    revision: str | None
    trust_remote_code: bool
    name_key: str  # the parameter that names it, for error messages
    config: Any
    tokenizer: Any
    source: dict  # name, local, revision, model_type

    @property
    def is_seq2seq(self) -> bool:
        return bool(self.config.is_encoder_decoder)

    def load_model(self):
        """The model as float32; a DataError when it is not a complete causal or sequence-to-sequence LM."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        loader = AutoModelForSeq2SeqLM if self.is_seq2seq else AutoModelForCausalLM
        local = Path(self.where)
        # Prefer safetensors; a folder with only PyTorch pickles is read with torch.load(weights_only=True),
        # which refuses any pickled object other than tensors and plain containers.
        use_safetensors = any(local.glob("*.safetensors")) if self.source["local"] else None
        if use_safetensors is False:
            log.warning("%s has no .safetensors weights: loading its .bin weights with weights_only=True", local)
        try:
            # float32 master weights, whatever precision the checkpoint was stored in.
            model, info = loader.from_pretrained(self.where, revision=self.revision,
                                                 trust_remote_code=self.trust_remote_code, dtype=torch.float32,
                                                 use_safetensors=use_safetensors, weights_only=True,
                                                 output_loading_info=True)
        except (OSError, ValueError, KeyError) as error:
            raise self._not_a_language_model(str(error).splitlines()[0]) from None
        # transformers fills weights the checkpoint lacks with random ones (an encoder-only model gets a
        # fresh LM head); a model with untrained parts is refused rather than used silently.
        missing = sorted(info["missing_keys"])
        if missing:
            raise self._not_a_language_model(f"{len(missing)} weights missing from the checkpoint, e.g. {missing[0]}")
        return model

    def _not_a_language_model(self, why: str) -> DataError:
        return DataError(f"{self.name_key} = {self.name!r}: cannot load it as a causal or sequence-to-sequence "
                         f"language model ({why})")


def open_checkpoint(name: str, revision: str, trust_remote_code: bool, name_key: str, trust_key: str) -> Checkpoint:
    """Read the config and tokenizer of the checkpoint `name` (hub id or local folder).

    Refuses a checkpoint that needs its own code unless `trust_remote_code`; a hub id that cannot be
    reached is a DataError that points to a local folder instead. Every error names the parameter
    `name_key` (e.g. `base_model.name`) or, for remote code, `trust_key`.
    """
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

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
        config = AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{name_key} = {name!r}: cannot load it as a causal or sequence-to-sequence "
                        f"language model ({str(error).splitlines()[0]})") from None
    source = {"name": name, "local": is_local, "revision": revision, "model_type": config.model_type}
    return Checkpoint(name, where, revision, trust, name_key, config, tokenizer, source)


def load_pretrained(name: str, revision: str, trust_remote_code: bool, name_key: str, trust_key: str):
    """(model, tokenizer, source) of the checkpoint `name`: `open_checkpoint`, then its weights as float32."""
    checkpoint = open_checkpoint(name, revision, trust_remote_code, name_key, trust_key)
    return checkpoint.load_model(), checkpoint.tokenizer, checkpoint.source
