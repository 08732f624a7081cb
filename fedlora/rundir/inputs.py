"""Digests of the files a run depends on beyond its config: the training data, the base model's
files and its tokenizer. A checkpoint records them, and a resume that finds them changed is
refused (:func:`fedlora.rundir.checkpoint.prepare_resume`), naming the file, both digests, sizes
and modification times, unless ``resume_allow_changed`` names the kind that changed.

What is recorded, by logical name (``data``, ``model/<file>``, ``tokenizer/<file>``), so a moved
virtual environment or Hugging Face cache (a different absolute path, same contents) still matches:

==========================  =====================================================================
``dataset.path``            the resolved file (``pkg://`` paths included); a local dataset folder:
                            each data file in it; a hub dataset: its ``datasets`` fingerprint
``model.gguf_package``      the ``.gguf`` file its ``assemble()`` returns (the tokenizer is inside)
a ``.gguf`` file            that file
a local model directory     config, weights and tokenizer files (``*.json``, ``*.safetensors``,
                            ``*.bin``, ``*.model``, ``*.txt``, ``*.tiktoken``, ``*.py``, ``*.jinja``;
                            no README/LICENSE)
a hub model id              the same files of its snapshot in the local hub cache
``tiny``                    nothing: the model is built from code and the run config
==========================  =====================================================================

**Cost.** Data, config and tokenizer files are hashed whole (sha256). Weight files over
:data:`FULL_HASH_LIMIT` get a sampled digest instead: sha256 of the size and
:data:`SAMPLE_BLOCKS` blocks of :data:`SAMPLE_BYTES` at evenly spaced offsets, first and last
included, so a 15 GB 7B model costs 16 MiB of reads per shard instead of a minute of hashing. It
catches a replaced, retrained, re-quantized or truncated file (its size or every tensor block
changes); it misses an in-place edit of the same size that touches none of the sampled blocks.
Digests are computed once per run (its first checkpoint) and once per resume; each later
checkpoint only ``stat``\\ s the files and hashes again one whose size or mtime changed. A hub
dataset is identified when the run starts and when it resumes, not at every checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import time
from pathlib import Path
from typing import Any

from fedlora.config import RESUME_INPUT_KINDS as KINDS  # what resume_allow_changed may name

FULL_HASH_LIMIT = 64 << 20
"""Weight files larger than this (bytes) get a sampled digest; every other file is hashed whole."""
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 1 << 20

SHA256 = "sha256"
SAMPLED = f"sampled-sha256:{SAMPLE_BLOCKS}x{SAMPLE_BYTES}"
FINGERPRINT = "datasets-fingerprint"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_MODEL_DIR_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".py", ".jinja")
_NOT_MODEL = ("readme", "license", "notice", "use_policy")
_TOKENIZER_NAMES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")
_DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
"""What ``load_records`` reads as a local file (a path with another suffix that is no file is a hub name)."""
_DATA_SUFFIXES = (*_DATA_FILE_SUFFIXES, ".arrow", ".txt")
"""Files of a local dataset folder that are data."""

Entry = dict[str, Any]
"""One input: ``kind`` (one of :data:`KINDS`), ``what`` (words for messages), ``method`` and
``digest`` (both None when it could not be identified, with ``why``), and for a file ``path``,
``bytes`` and ``mtime_ns``."""


# ---------------------------------------------------------------------------------------------
# digests


def file_digest(path: str | Path, method: str) -> str:
    """The ``method`` digest of a file: :data:`SHA256` (whole file) or :data:`SAMPLED`. Raises
    ``OSError`` when the file cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if method == SAMPLED:
            size = os.fstat(f.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            last = max(size - SAMPLE_BYTES, 0)
            for i in range(SAMPLE_BLOCKS):
                f.seek(last * i // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
        elif method == SHA256:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            raise ValueError(f"unknown digest method {method!r}")
    return h.hexdigest()


def file_entry(kind: str, what: str, path: str | Path, method: str | None = None) -> Entry:
    """An :data:`Entry` for a local file; ``method`` None: sampled for a large weight file, else whole."""
    path = Path(path)
    try:
        st = os.stat(path)
        if method is None:
            method = SAMPLED if path.suffix in _WEIGHT_SUFFIXES and st.st_size > FULL_HASH_LIMIT else SHA256
        digest = file_digest(path, method)
    except OSError as err:
        return {"kind": kind, "what": what, "path": str(path), "method": None, "digest": None,
                "why": f"cannot read it ({err.strerror or err})"}
    return {"kind": kind, "what": what, "path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "method": method, "digest": digest}


def _unknown(kind: str, what: str, why: str) -> Entry:
    return {"kind": kind, "what": what, "method": None, "digest": None, "why": why}


# ---------------------------------------------------------------------------------------------
# what a config depends on


def input_entries(config: dict[str, Any], methods: dict[str, str] | None = None) -> dict[str, Entry]:
    """Logical name → :data:`Entry` for every file ``config`` (a ``config_to_dict`` mapping) reads
    besides itself: data, model and tokenizer. ``methods`` (name → method) makes a file's digest
    comparable with one recorded earlier. Never raises for a missing or unreachable input: its
    entry says why it has no digest (the run's own checks then name the problem)."""
    out = data_entries(config.get("dataset") or {})
    out.update(model_entries(config.get("model") or {}))
    for name, method in (methods or {}).items():
        entry = out.get(name)
        if entry and entry.get("path") and method in (SHA256, SAMPLED) and entry["method"] != method:
            out[name] = file_entry(entry["kind"], entry["what"], entry["path"], method)
    return out


def data_entries(dataset: dict[str, Any]) -> dict[str, Entry]:
    """The training data of ``dataset`` (``DatasetConfig`` as a dict)."""
    from fedlora.data.records import DataError, resolve_path  # records pulls in datasets and torch

    given = dataset.get("path")
    if not given:
        return {}
    what = f"data file (dataset.path={given!r})"
    try:
        path = resolve_path(given)
    except DataError as err:
        return {"data": _unknown("data", what, str(err))}
    if os.path.isfile(path) or Path(path).suffix.lower() in _DATA_FILE_SUFFIXES or given.startswith("pkg://"):
        return {"data": file_entry("data", what, os.path.abspath(path))}
    if os.path.isdir(path):
        root = Path(path)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        return {f"data/{p.relative_to(root).as_posix()}": file_entry("data", f"data file {p.relative_to(root)} of "
                                                                             f"dataset.path={given!r}", p.resolve())
                for p in files}
    return {"data": hub_dataset_entry(path, dataset.get("split", "train"))}


def hub_dataset_entry(name: str, split: str) -> Entry:
    """A hub dataset's version: its ``datasets`` fingerprint (the builder's config and data files)."""
    import datasets

    what = f"hub dataset {name!r} (split {split!r})"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # unreachable hub, unknown name: the run's own loading names it
        return _unknown("data", what, f"cannot load it ({type(err).__name__}: {err})")
    return {"kind": "data", "what": what, "name": name, "split": split, "method": FINGERPRINT,
            "digest": ds._fingerprint}


def model_entries(model: dict[str, Any]) -> dict[str, Entry]:
    """The base model's files, found as :data:`fedlora.model.loading.SOURCES` finds the model."""
    name = model.get("name_or_path") or "tiny"
    if name == "tiny":
        return {}
    if model.get("gguf_package"):
        what = f"GGUF file of model.gguf_package={model['gguf_package']!r}"
        try:
            path = Path(importlib.import_module(model["gguf_package"]).assemble())
        except Exception as err:  # not installed, no assemble(): loading the model names it
            return {"model/gguf": _unknown("model", what, f"cannot locate it ({type(err).__name__}: {err})")}
        return {f"model/{path.name}": file_entry("model", what, path)}
    path = Path(name).expanduser()
    gguf = model.get("gguf_file")
    if path.is_dir() and gguf:
        path = path / gguf
    if path.suffix == ".gguf" or path.is_dir():
        return _local_model_entries(path.resolve())
    return _hub_model_entries(name, gguf)


def _local_model_entries(path: Path) -> dict[str, Entry]:
    if path.suffix == ".gguf" and not path.is_dir():
        return {f"model/{path.name}": file_entry("model", f"model file {path}", path)}
    out: dict[str, Entry] = {}
    for p in sorted(path.iterdir()):
        low = p.name.lower()
        if (not p.is_file() or low.startswith(".") or p.suffix.lower() not in _MODEL_DIR_SUFFIXES
                or low.startswith(_NOT_MODEL)):
            continue
        kind = "tokenizer" if (low.startswith("tokenizer") or low in _TOKENIZER_NAMES or "chat_template" in low
                               or p.suffix in (".model", ".tiktoken")) else "model"
        out[f"{kind}/{p.name}"] = file_entry(kind, f"{kind} file {p}", p.resolve())
    return out


def _hub_model_entries(name: str, gguf: str | None) -> dict[str, Entry]:
    """A hub model's files as cached locally (``local_files_only``: nothing is downloaded)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if gguf:
            path = Path(hf_hub_download(name, gguf, local_files_only=True))
            return {f"model/{gguf}": file_entry("model", f"model file {gguf} of hub model {name!r}", path.resolve())}
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # not in the cache (or no hub library support): cannot be identified here
        return {"model": _unknown("model", f"hub model {name!r}", f"not in the local hub cache ({type(err).__name__})")}
    return {k: {**e, "what": f"{e['what']} (hub model {name!r}, revision {snapshot.name})"}
            for k, e in _local_model_entries(snapshot).items()}


# ---------------------------------------------------------------------------------------------
# comparing and refreshing


def compare(recorded: dict[str, Entry], current: dict[str, Entry]) -> tuple[list[dict[str, Any]], list[str]]:
    """(changes, notes): a change is ``{"name", "kind", "what", "old", "new"}`` (``old`` or ``new``
    None for a file that appeared or went away); a note names an input that could not be verified
    (no digest on one side, e.g. a hub model not in the local cache)."""
    changes, notes = [], []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        entry = new or old
        if old is not None and new is not None and (old.get("digest") is None or new.get("digest") is None):
            notes.append(f"{entry['what']}: {(new if new.get('digest') is None else old).get('why', 'no digest')}")
            continue
        if old is None or new is None or (old["method"], old["digest"]) != (new["method"], new["digest"]):
            changes.append({"name": name, "kind": entry["kind"], "what": entry["what"], "old": old, "new": new})
    return changes, notes


def refresh(recorded: dict[str, Entry]) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
    """``recorded`` brought up to date cheaply: a file whose size and mtime are unchanged keeps its
    digest unread; any other is hashed again (same method). Returns (entries, changes as in
    :func:`compare`). Entries without a file (hub datasets, unidentified inputs) are kept."""
    out, changes = {}, []
    for name, old in recorded.items():
        path = old.get("path")
        if not path or old.get("digest") is None:
            out[name] = old
            continue
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and (st.st_size, st.st_mtime_ns) == (old["bytes"], old["mtime_ns"]):
            out[name] = old
            continue
        new = file_entry(old["kind"], old["what"], path, old["method"])
        out[name] = new
        if (new["method"], new["digest"]) != (old["method"], old["digest"]):
            changes.append({"name": name, "kind": old["kind"], "what": old["what"], "old": old,
                            "new": new if new["digest"] is not None else None})
    return out, changes


def describe(change: dict[str, Any]) -> str:
    """One change in words: what, the file, old and new digest, size and modification time."""
    old, new = change["old"], change["new"]
    if old is None:
        return f"{change['what']} is new ({_stamp(new)})"
    if new is None:
        return f"{change['what']} is gone (it had {_stamp(old)})"
    where = f" {new['path']}" if new.get("path") and new["path"] not in change["what"] else ""
    return f"{change['what']}{where} changed: {_stamp(old)} then, {_stamp(new)} now"


def _stamp(e: Entry) -> str:
    parts = [f"{e['method']} {str(e['digest'])[:16]}"]
    if "bytes" in e:
        parts.append(f"{e['bytes']} bytes")
    if "mtime_ns" in e:
        parts.append("modified " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["mtime_ns"] / 1e9)))
    return ", ".join(parts)
