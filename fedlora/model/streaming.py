"""Quantize while loading: a safetensors checkpoint read one tensor at a time into the model's
skeleton, each targeted linear quantized on the target device as soon as its weight (and bias)
has arrived, so peak memory is the final quantized model plus about one layer.

The plain path (:func:`fedlora.model.loading.load_model`, then
:func:`fedlora.quant.model.quantize_model`) holds the whole model in full precision before the
first layer is quantized: at 7B width with 2 decoder layers, 2.6 GiB of fp32 for a 1.2 GiB nf4
base (embeddings and head stay dense). :func:`load_quantized` instead

1. builds the model's module tree on the meta device from its config
   (:func:`fedlora.model.targets.model_config`; no weights allocated) in the configured dtype, as
   ``from_pretrained`` does, and checks ``adapter.target_modules`` on it
   (:func:`fedlora.adapters.targets.resolve_module_targets`) before reading any weight;
2. picks the layers to quantize with the quantizer's own rule
   (:func:`fedlora.quant.model.quantize_targets`: ``quant.targets=adapted`` → the layers the
   adapter patterns resolve to, ``all_linear`` → every linear but the output head), checked for
   shape problems up front;
3. reads the checkpoint's tensors in file order (one shard after another; the
   ``model.safetensors.index.json`` names the shards) with plain reads into fresh tensors — not
   through ``mmap``, whose touched pages would count towards the process's resident memory until
   the file is closed;
4. puts each non-targeted tensor in place on the target device, floating ones cast to the
   configured dtype (tied weights — Gemma's and GPT-2's head and embeddings — share one
   ``Parameter``, as the skeleton ties them), and replaces each targeted linear, once complete, by
   ``QuantLinear.from_linear`` (the code ``quantize_model`` runs), dropping the dense tensor;
5. re-creates the non-persistent buffers (rotary frequencies, Gemma's embedding scale) with the
   model's own ``_init_weights``, as ``from_pretrained`` does, cast like the rest.

The result equals the plain path bit for bit: the same packed codes and scales, the same dense
tensors and buffers, the same logits (``tests/test_streaming_load.py``, nf4/int8/int4, Llama,
Qwen2 with biases, GPT-2's tied ``Conv1D``, Gemma 3). Measured in ``benchmarks/load_quantized.py``.

The plain path is kept (``load_quantized`` returns ``report=None`` and the caller quantizes as
before) when there is nothing to stream or stream into:

* ``quant.format=none`` — nothing to quantize; ``from_pretrained`` already loads shard by shard;
* ``quant.init=loftq`` — LoftQ fits the quantized base to the adapters, which are injected after
  loading; it runs on the fully loaded model as before (a note is logged once per process);
* the ``tiny`` model (built in memory) and hub ids (no local files);
* a checkpoint that lacks one of the model's weights or stores it under another name or shape
  (``from_pretrained`` would rename, convert or randomly initialise it; logged once).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedlora.adapters.targets import resolve_module_targets
from fedlora.config import FedloraConfig
from fedlora.model.loading import (
    ModelError,
    checkpoint_dir,
    finish_tokenizer,
    load_model,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
)
from fedlora.model.targets import model_config
from fedlora.quant.linear import QuantLinear
from fedlora.quant.model import model_bytes, quantize_targets
from fedlora.worker_cache import first_time

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
"""safetensors dtype codes → torch dtypes."""


# ---------------------------------------------------------------------------------------------
# reading safetensors files without mmap


class TensorEntry:
    """Where one tensor lies in a safetensors file: dtype, shape, byte range from the data start."""

    __slots__ = ("dtype", "file", "shape", "start", "stop")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, stop: int) -> None:
        self.file, self.dtype, self.shape, self.start, self.stop = file, dtype, shape, start, stop


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` would read in ``directory``, in the index's order
    (``model.safetensors.index.json``), else ``[model.safetensors]``; ``[]`` when there is neither."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    single = directory / SINGLE_FILE
    return [single] if single.is_file() else []


def read_index(files: list[Path]) -> dict[str, TensorEntry]:
    """Tensor name → :class:`TensorEntry` over ``files`` (their headers only). Raises
    :class:`ModelError` for a file that is not a well-formed safetensors file."""
    out: dict[str, TensorEntry] = {}
    for path in files:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (size,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(size))
            except ValueError as err:
                raise ModelError(f"{path} is not a safetensors file (its header is not JSON: {err})") from err
        base = 8 + size
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta.get("dtype") not in _DTYPES:
                raise ModelError(f"{path}: tensor {name!r} has dtype {meta.get('dtype')!r}, which fedlora cannot "
                                 f"read; supported: {', '.join(_DTYPES)}")
            start, stop = meta["data_offsets"]
            entry = TensorEntry(path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), base + start, base + stop)
            numel = 1
            for d in entry.shape:
                numel *= d
            if stop - start != numel * entry.dtype.itemsize:
                raise ModelError(f"{path}: tensor {name!r} spans {stop - start} bytes, but {meta['dtype']} "
                                 f"{entry.shape} needs {numel * entry.dtype.itemsize}; the file is damaged")
            out[name] = entry
    return out


def read_tensor(f, entry: TensorEntry) -> torch.Tensor:
    """The tensor ``entry`` describes, read from the open binary file ``f`` into a fresh CPU tensor
    (plain reads: nothing of the file stays mapped)."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
    f.seek(entry.start)
    done, total = 0, entry.stop - entry.start
    while done < total:
        n = f.readinto(view[done:])
        if not n:
            raise ModelError(f"{entry.file} ends inside a tensor; the file is truncated")
        done += n
    return t


def stream_tensors(entries: dict[str, TensorEntry], names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each of ``names``, file by file, in each file's storage order."""
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name in names:
        by_file.setdefault(entries[name].file, []).append((name, entries[name]))
    for path, items in by_file.items():
        with open(path, "rb", buffering=0) as f:
            for name, entry in sorted(items, key=lambda item: item[1].start):
                yield name, read_tensor(f, entry)


# ---------------------------------------------------------------------------------------------
# the skeleton and what goes where


def _skeleton(config, dtype: torch.dtype, name: str) -> PreTrainedModel:
    """The model on the meta device, built in ``dtype`` as ``from_pretrained(dtype=...)`` builds it
    (so buffers created at construction get the dtype they get there)."""
    try:
        with quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise ModelError(f"{name!r} is not a causal LM ({str(err).splitlines()[0]}); use a decoder-only model") from err


def _slots(model: nn.Module) -> tuple[dict[str, list[tuple[nn.Module, str]]], dict[str, str]]:
    """(canonical name → every (module, attribute) holding that tensor; any name → canonical name)
    over parameters and persistent buffers. Tied parameters (one object under several names) get
    one canonical name: the first ``named_parameters`` gives (the input embedding for a tied head)."""
    slots: dict[str, list[tuple[nn.Module, str]]] = {}
    canonical: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        canonical[name] = key
        module_name, _, attr = name.rpartition(".")
        slots.setdefault(key, []).append((model.get_submodule(module_name), attr))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, buf in module._buffers.items():
            if buf is None or attr in module._non_persistent_buffers_set:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            key = first.setdefault(id(buf), name)
            canonical[name] = key
            slots.setdefault(key, []).append((module, attr))
    return slots, canonical


def _source_names(slots, canonical, entries: dict[str, TensorEntry]) -> tuple[dict[str, str], list[str]]:
    """(checkpoint name → canonical name, one per canonical tensor; canonical names with no usable
    checkpoint tensor, each with the reason). A tied group takes its canonical name's tensor when
    stored, else any other name of the group."""
    names: dict[str, list[str]] = {}
    for name, key in canonical.items():
        names.setdefault(key, []).append(name)
    chosen: dict[str, str] = {}
    for key, group in names.items():
        stored = [n for n in sorted(group, key=lambda n: n != key) if n in entries]  # the canonical name first
        if stored:
            chosen[stored[0]] = key
    problems = []
    got = set(chosen.values())
    for key, places in slots.items():
        if key not in got:
            problems.append(f"{key} is not in the checkpoint")
            continue
        src = next(n for n, k in chosen.items() if k == key)
        module, attr = places[0]
        want = tuple(getattr(module, attr).shape)
        if entries[src].shape != want:
            problems.append(f"{src} has shape {entries[src].shape} in the checkpoint, the model needs {want}")
    return chosen, problems


def _place(places: list[tuple[nn.Module, str]], value: torch.Tensor) -> None:
    """Put ``value`` in every (module, attribute) of one tensor (a Parameter for parameters)."""
    module, attr = places[0]
    if attr in module._parameters:
        value = nn.Parameter(value, requires_grad=False)
    for module, attr in places:
        if attr in module._parameters:
            module._parameters[attr] = value
        else:
            module._buffers[attr] = value


def _init_non_persistent(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> None:
    """Re-create every non-persistent buffer (on the meta device until now) with the model's own
    ``_init_weights`` on the module that owns it, as ``from_pretrained`` does; every loaded tensor
    is marked initialised first so that call leaves them alone. Floating buffers end in ``dtype``."""
    owners = [m for m in model.modules() if any(b is not None and b.is_meta for n, b in m._buffers.items()
                                                if n in m._non_persistent_buffers_set)]
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            t._is_hf_initialized = True
    for module in owners:
        for attr in module._non_persistent_buffers_set:
            buf = module._buffers.get(attr)
            if buf is not None and buf.is_meta:
                module._buffers[attr] = torch.empty_like(buf, device=device)
        with torch.no_grad():
            model._init_weights(module)
        for attr in module._non_persistent_buffers_set:
            buf = module._buffers.get(attr)
            if buf is not None and buf.is_floating_point():
                module._buffers[attr] = buf.to(dtype)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ModelError(f"{type(model).__name__}: the model's own init left buffer(s) {left[:3]} unset; "
                         "load this model with quant.format=none and quantize after loading instead")


# ---------------------------------------------------------------------------------------------
# the entry point


def load_quantized(cfg: FedloraConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict | None]:
    """The frozen base on ``cfg.model.device`` in ``cfg.model.dtype``, eval mode, and its tokenizer
    (as :func:`fedlora.model.loading.load_model` gives them), with the layers ``cfg.quant`` targets
    already quantized when the checkpoint could be streamed.

    Returns ``(model, tokenizer, report)``: ``report`` is what
    :func:`fedlora.quant.model.quantize_model` would have returned (same keys and values, bar
    ``seconds``, which here cover loading as well) when the model was streamed, and ``None`` when
    the plain path ran (see the module docstring for when): the model is then dense and the caller
    quantizes it. Raises :class:`ModelError` for an unreadable source or damaged file,
    :class:`fedlora.adapters.targets.TargetError` for patterns that do not resolve, and
    :class:`fedlora.quant.QuantError` for layers the format cannot take — each before any weight
    is read.
    """
    if cfg.quant.format == "none":
        return (*load_model(cfg.model), None)
    if cfg.quant.init == "loftq":
        if first_time("streaming: loftq"):
            logger.info("quant.init=loftq: the base is loaded whole, then quantized (LoftQ needs the adapters)")
        return (*load_model(cfg.model), None)
    directory = checkpoint_dir(cfg.model)
    files = checkpoint_files(directory) if directory is not None else []
    if not files:
        return (*load_model(cfg.model), None)
    started = time.time()
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    config = model_config(cfg.model)
    model = _skeleton(config, dtype, cfg.model.name_or_path)
    if not (model.can_generate() and model.get_output_embeddings() is not None):
        raise ModelError(f"{cfg.model.name_or_path!r} loaded as {type(model).__name__}, which is not a causal LM")
    resolve_module_targets(model, cfg.adapter.target_modules)
    targets = quantize_targets(model, cfg.quant, cfg.adapter.target_modules)  # raises QuantError first
    entries = read_index(files)
    slots, canonical = _slots(model)
    chosen, problems = _source_names(slots, canonical, entries)
    if problems:
        if first_time(f"streaming: plain load {directory}"):
            logger.warning("%s cannot be streamed (%s%s); loading it whole, then quantizing", directory,
                           "; ".join(problems[:3]), f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        return (*load_model(cfg.model), None)
    before = _dense_bytes(model, dtype)

    pending = {name: {attr for attr, p in model.get_submodule(name).named_parameters(recurse=False)}
               for name in targets}  # targeted layer → its parameters still to come
    owner = {f"{name}.{attr}": name for name, attrs in pending.items() for attr in attrs}
    report = {"format": cfg.quant.format, "targets": cfg.quant.targets, "layers": 0, "per_format": {},
              "quantized_params": 0, "quantized_bytes": 0, "bytes_per_param": None, "dense_bytes": 0,
              "base_bytes_before": before, "base_bytes_after": before, "loftq": None, "seconds": 0.0}  # fmt: skip
    with torch.no_grad():
        for src, tensor in stream_tensors(entries, set(chosen)):
            key = chosen[src]
            value = tensor.to(dtype) if tensor.is_floating_point() else tensor
            del tensor
            _place(slots.pop(key), value.to(device))  # popped: a replaced dense layer must not stay referenced
            del value
            layer_name = owner.get(key)
            if layer_name is None:
                continue
            pending[layer_name].discard(key.rpartition(".")[2])
            if not pending[layer_name]:
                _quantize_in_place(model, layer_name, cfg, report)
    _init_non_persistent(model, device, dtype)
    model.eval().requires_grad_(False)
    model.config._name_or_path = str(directory)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    report.update(per_format={cfg.quant.format: report["layers"]} if report["layers"] else {},
                  bytes_per_param=report["quantized_bytes"] / report["quantized_params"],
                  base_bytes_after=model_bytes(model), seconds=round(time.time() - started, 2))  # fmt: skip
    return model, finish_tokenizer(tokenizer, cfg.model.name_or_path), report


def _quantize_in_place(model: nn.Module, name: str, cfg: FedloraConfig, report: dict) -> None:
    """Replace the now complete dense layer ``name`` by its :class:`QuantLinear`; count it in ``report``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    layer = QuantLinear.from_linear(linear, cfg.quant)
    setattr(parent, child, layer)
    report["layers"] += 1
    report["quantized_params"] += linear.weight.numel()
    report["quantized_bytes"] += layer.nbytes
    report["dense_bytes"] += linear.weight.numel() * linear.weight.element_size()


def _dense_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What :func:`fedlora.quant.model.model_bytes` gives for the loaded dense model: every
    parameter and buffer once, floating ones in ``dtype`` (read from the meta skeleton)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total
