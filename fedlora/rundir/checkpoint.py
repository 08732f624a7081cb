"""Server checkpoints: everything a stopped run needs to continue, and the checks that make
resuming it safe.

After every round the server writes ``RUN_DIR/checkpoints/round-NNNNN/``::

    state.safetensors   every tensor: the global adapter, the base terms (FedEx residuals, FLoRA
                        stacks), strategy extras (Fed-SB frame and core R, …), torch RNG states
    manifest.json       format version, round, the run's config and its fingerprint,
                        the state's structure (tensors by name), Python/NumPy/sampling RNG states,
                        the privacy ledger's length, the metrics rows so far, server-side extras
                        (client-level accountant, init cost), the digests of the run's inputs
                        (data, model and tokenizer files: :mod:`fedlora.rundir.inputs`) and every
                        change to them that was accepted or seen, sha256 and size of
                        state.safetensors, and its own sha256

A round directory is built under a temporary name and renamed into place in one ``os.rename``, so
a ``round-*`` directory is always complete; the newest :data:`KEEP` are kept. Loading verifies
every hash and size and the fingerprint before anything is touched, so a corrupt or incompatible
checkpoint is refused with what is wrong and how to fix it, and nothing in the run directory
changes (:func:`prepare_resume` only reads). So is a resume whose data, model or tokenizer files
differ from the ones the checkpoint recorded, unless ``resume_allow_changed`` names that kind; the
change is then recorded in every later checkpoint (``inputs.changes`` in the manifest).

Clients keep their own state: under example-level DP each client's accountant is saved by the
client before it replies (``RUN_DIR/clients/<id>/privacy.json`` in simulation,
``$FEDLORA_PRIVACY_DIR`` on a deployed node), and the privacy ledger is append-only, so a resumed
run continues every ε from where it stood, including any round that was cut off after a client
released its update.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedlora.adapters.state import LoraFactors
from fedlora.aggregation.common import GlobalState
from fedlora.aggregation.terms import DenseTerm
from fedlora.config import unflatten
from fedlora.rundir import inputs as run_inputs
from fedlora.rundir.files import (
    CHECKPOINT_MANIFEST_FILE,
    CHECKPOINT_STATE_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LEDGER_FILE,
    ledger_entries_since,  # noqa: F401  (re-exported: server/loop.py imports it from here)
    ledger_position,
)

FORMAT_VERSION = 1
KEEP = 2
"""Round directories kept: the newest, and one before it in case the newest is damaged."""

MAY_CHANGE = ("num_rounds", "run_dir", "resume", "resume_allow_changed", "eval", "model.device", "model.cache_dir",
              "client_cpus", "client_gpus", "client_rank_tiers", "strategy.round_timeout", "strategy.max_reply_bytes")
"""Config keys a resumed run may change: where and how long it runs, how it evaluates, how long it
waits. Every other key is part of the fingerprint and must equal the checkpoint's."""


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or made by a different run; the message says the fix."""


# ---------------------------------------------------------------------------------------------
# config fingerprint


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" != "adapter.rank_pattern":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def fingerprint_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys (and values) a resumed run must share with its checkpoint."""
    return {k: v for k, v in sorted(_flatten(config).items()) if not _may_change(k)}


def fingerprint(config: dict[str, Any]) -> str:
    return _sha256_bytes(json.dumps(fingerprint_fields(config), sort_keys=True, default=str).encode())


# ---------------------------------------------------------------------------------------------
# state ↔ (JSON tree, named tensors)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree for ``value``; tensors go to ``tensors`` under a name derived from ``path``."""
    if isinstance(value, torch.Tensor):
        name = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        return {"$ndarray": _encode(torch.from_numpy(np.ascontiguousarray(value)), path, tensors)}
    if isinstance(value, LoraFactors):
        return {"$lora": {"A": _encode(value.A, f"{path}/A", tensors), "B": _encode(value.B, f"{path}/B", tensors),
                          "scale": float(value.scale)}}
    if isinstance(value, DenseTerm):
        return {"$dense": {"weight": _encode(value.weight, f"{path}/weight", tensors), "scale": float(value.scale)}}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        for k in value:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise CheckpointError(f"cannot checkpoint {path}: mapping key {k!r} of type {type(k).__name__}")
        return {"$map": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(
        f"cannot checkpoint {path} of type {type(value).__name__}; strategy state must be tensors, "
        "LoraFactors, DenseTerm, numbers, strings and lists/dicts of them (docs/aggregation.md, 'Strategy state')"
    )


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, body), = tree.items()
        if tag == "$tensor":
            return tensors[body]
        if tag == "$ndarray":
            return _decode(body, tensors).numpy()
        if tag == "$lora":
            return LoraFactors(_decode(body["A"], tensors), _decode(body["B"], tensors), float(body["scale"]))
        if tag == "$dense":
            return DenseTerm(_decode(body["weight"], tensors), float(body["scale"]))
        if tag == "$map":
            return {k: _decode(v, tensors) for k, v in body}
        if tag == "$tuple":
            return tuple(_decode(v, tensors) for v in body)
    return {k: _decode(v, tensors) for k, v in tree.items()}


def encode_state(state: GlobalState) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``GlobalState`` → (JSON tree, named tensors); :func:`decode_state` inverts it exactly."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {part: _encode(getattr(state, part), f"state/{part}", tensors) for part in ("adapter", "base_terms", "extras")}
    return tree, tensors


def decode_state(tree: dict[str, Any], tensors: dict[str, torch.Tensor]) -> GlobalState:
    return GlobalState(**{part: _decode(tree[part], tensors) for part in ("adapter", "base_terms", "extras")})


# ---------------------------------------------------------------------------------------------
# RNG states


def _py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def capture_rng(sampling: random.Random) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python's, NumPy's and torch's global RNGs and the server's client-sampling RNG."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": _py_state(random.getstate()), "sampling": _py_state(sampling.getstate()),
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    tensors = {"rng/torch": torch.get_rng_state()}
    for i in range(rng["cuda_devices"]):
        tensors[f"rng/cuda/{i}"] = torch.cuda.get_rng_state(i)
    return rng, tensors


def restore_rng(rng: dict[str, Any], tensors: dict[str, torch.Tensor], sampling: random.Random) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when this machine has the same GPUs)."""
    to_tuple = lambda s: (s[0], tuple(s[1]), s[2])  # noqa: E731
    random.setstate(to_tuple(rng["python"]))
    sampling.setstate(to_tuple(rng["sampling"]))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available() and torch.cuda.device_count() == rng.get("cuda_devices"):
        for i in range(rng["cuda_devices"]):
            torch.cuda.set_rng_state(tensors[f"rng/cuda/{i}"], i)


# ---------------------------------------------------------------------------------------------
# the checkpoint


@dataclass
class Checkpoint:
    """One round's server state as a plain value."""

    round: int
    state: GlobalState
    config: dict[str, Any]
    """The run's config (``config_to_dict``); its fingerprint is stored with the checkpoint."""
    metrics: list[dict[str, Any]]
    """``metrics.jsonl`` rows 0 … ``round``."""
    rng: dict[str, Any] = field(default_factory=dict)
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ledger: dict[str, int] = field(default_factory=lambda: {"bytes": 0, "entries": 0})
    """Length of ``privacy_ledger.jsonl`` when the round was saved."""
    server: dict[str, Any] = field(default_factory=dict)
    """Server-side values beyond the strategy state: client ranks, Fed-SB init cost, the
    client-level DP accountant (JSON), wall seconds so far."""
    path: Path | None = None
    inputs: dict[str, Any] | None = None
    """The digests of the run's inputs: ``{"round", "entries": {name: entry}, "changes": [...]}``
    (:mod:`fedlora.rundir.inputs`); None in a checkpoint written before fedlora recorded them.
    :func:`prepare_resume` replaces it with the inputs as verified now (and the change it
    accepted); :func:`save_checkpoint` fills it when it is None."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def round_dir(run_dir: str | Path, rnd: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"round-{rnd:05d}"


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256_bytes(json.dumps(body, sort_keys=True, default=str).encode())  # as written, so as read back


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep: int = KEEP) -> Path:
    """Write ``checkpoints/round-NNNNN/`` atomically; drop all but the newest ``keep``."""
    final = round_dir(run_dir, ckpt.round)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    inputs = _inputs_to_save(run_dir, ckpt)
    try:
        tree, tensors = encode_state(ckpt.state)
        tensors.update(ckpt.rng_tensors)
        save_file(tensors, str(tmp / CHECKPOINT_STATE_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        with open(tmp / CHECKPOINT_STATE_FILE, "rb+") as f:
            os.fsync(f.fileno())
        manifest = {
            "format_version": FORMAT_VERSION, "round": ckpt.round, "fingerprint": fingerprint(ckpt.config),
            "config": ckpt.config, "state": tree, "rng": ckpt.rng, "ledger": ckpt.ledger, "server": ckpt.server, "metrics": ckpt.metrics,
            "inputs": inputs,
            "files": {CHECKPOINT_STATE_FILE: {"sha256": _sha256_file(tmp / CHECKPOINT_STATE_FILE), "bytes": (tmp / CHECKPOINT_STATE_FILE).stat().st_size}},
        }  # fmt: skip
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        with open(tmp / CHECKPOINT_MANIFEST_FILE, "w") as f:
            f.write(json.dumps(manifest, indent=1, default=str))
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # only when a round is redone after its newer checkpoints were removed
            trash = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in round_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-round-*"), *root.glob(".old-round-*")]:  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)  # (one server writes a run directory at a time)
    return final


def _inputs_to_save(run_dir: str | Path, ckpt: Checkpoint) -> dict[str, Any]:
    """The inputs record for the checkpoint of ``ckpt.round``: ``ckpt.inputs`` (as a resume
    verified them) or else the newest checkpoint's, with each file ``stat``-ed and hashed again
    only if its size or mtime changed; computed whole for a run's first checkpoint. A file that
    changed since the record was made is a change seen during the run: it is printed and recorded
    (``allowed_by`` names ``resume_allow_changed`` when this resumed run allowed that kind)."""
    prev = None
    for newest in reversed(round_dirs(run_dir)):
        try:
            prev = json.loads((newest / CHECKPOINT_MANIFEST_FILE).read_text()).get("inputs")
        except (OSError, ValueError, AttributeError):
            prev = None
        break
    base = ckpt.inputs
    if base is None or (prev is not None and prev["round"] > base["round"]):
        base = prev
    if base is None:
        return {"round": ckpt.round, "entries": run_inputs.input_entries(ckpt.config), "changes": []}
    entries, items = run_inputs.refresh(base["entries"])
    changes = list(base.get("changes", []))
    if items:
        kinds = sorted({c["kind"] for c in items})
        allowed = ckpt.config.get("resume") and set(kinds) <= set(ckpt.config.get("resume_allow_changed") or [])
        changes.append({"after_round": base["round"], "seen_at_round": ckpt.round,
                        "allowed_by": f"resume_allow_changed=[{','.join(kinds)}]" if allowed else None, "items": items})
        if not allowed:
            print(f"fedlora: warning: the run's inputs changed while it ran, after round {base['round']}: "
                  f"{'; '.join(run_inputs.describe(c) for c in items)}. Rounds after {base['round']} may mix old and new "
                  f"contents; recorded in checkpoint round {ckpt.round} (inputs.changes in {CHECKPOINT_MANIFEST_FILE})",
                  flush=True)
    return {"round": ckpt.round, "entries": entries, "changes": changes}


def round_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-") and p.name[6:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[6:]))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one round directory; raises :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / CHECKPOINT_MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CHECKPOINT_MANIFEST_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CHECKPOINT_MANIFEST_FILE} is not valid JSON (truncated or damaged: {err})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version!r}; this fedlora reads format {FORMAT_VERSION} "
                              "(use the fedlora version that wrote it)")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CheckpointError(f"{path / CHECKPOINT_MANIFEST_FILE} fails its sha256 check (edited or damaged)")
    files = manifest.get("files")
    if not isinstance(files, dict) or CHECKPOINT_STATE_FILE not in files:
        raise CheckpointError(f"{path / CHECKPOINT_MANIFEST_FILE} does not list {CHECKPOINT_STATE_FILE}")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes, the manifest says {meta['bytes']} (truncated or damaged)")
        if _sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"{file} fails its sha256 check (damaged)")
    try:
        tensors = load_file(str(path / CHECKPOINT_STATE_FILE))
        state = decode_state(manifest["state"], tensors)
        return Checkpoint(
            round=int(manifest["round"]), state=state, config=manifest["config"], metrics=manifest["metrics"],
            rng=manifest["rng"], rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng/")},
            ledger=manifest["ledger"], server=manifest["server"], path=path, inputs=manifest.get("inputs"),
        )  # fmt: skip
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path / CHECKPOINT_STATE_FILE} cannot be read: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} does not hold a complete server state (missing {err})") from None


def check_compatible(ckpt: Checkpoint, config: dict[str, Any], run_dir: Path) -> None:
    """Refuse a checkpoint whose fingerprinted settings differ from ``config``, or whose round is
    past ``num_rounds``, naming each difference and the fix."""
    then, now = fingerprint_fields(ckpt.config), fingerprint_fields(config)
    diff = [k for k in sorted(set(then) | set(now)) if then.get(k, "<absent>") != now.get(k, "<absent>")]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {then.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}" for k in diff[:6])
        more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
        raise CheckpointError(
            f"checkpoint {ckpt.path} belongs to a different run configuration: {shown}{more}. Resume with the "
            f"settings in {run_dir / CONFIG_FILE} (a resumed run may change only {', '.join(MAY_CHANGE)}), or "
            "start a new run in a new directory"
        )
    planned, num_rounds = int(ckpt.config["num_rounds"]), int(config["num_rounds"])
    if num_rounds < ckpt.round:
        raise CheckpointError(f"num_rounds={num_rounds} is below the checkpoint's round {ckpt.round} ({ckpt.path}); "
                              f"pass num_rounds={ckpt.round} or more")
    dp = config.get("dp", {})
    if dp.get("mode", "none") != "none" and dp.get("target_epsilon") is not None and num_rounds != planned:
        raise CheckpointError(
            f"dp.target_epsilon={dp['target_epsilon']} calibrated σ for num_rounds={planned}; a resumed run cannot "
            f"change the planned rounds (now {num_rounds}). Keep num_rounds={planned}, or start a new run with "
            "dp.noise_multiplier"
        )


def verify_inputs(ckpt: Checkpoint, config: dict[str, Any]) -> dict[str, Any]:
    """The run's data, model and tokenizer files now (:func:`fedlora.rundir.inputs.input_entries`)
    against the digests ``ckpt`` recorded. Raises :class:`CheckpointError` naming each changed,
    new or missing file (both digests, sizes, mtimes) and the fix, unless
    ``config["resume_allow_changed"]`` lists its kind; then the change is printed and returned in
    the record's ``changes`` so every later checkpoint carries it. A checkpoint without digests
    (an earlier fedlora) passes with a printed note. Returns the inputs record to continue with."""
    allowed = list(config.get("resume_allow_changed") or [])
    if ckpt.inputs is None:
        print(f"fedlora: note: {ckpt.path} was written by a fedlora that did not record the digests of its inputs, "
              "so the data, model and tokenizer files could not be verified against the ones the run used; "
              "they are recorded from now on", flush=True)
        return {"round": ckpt.round, "entries": run_inputs.input_entries(config),
                "changes": [{"after_round": ckpt.round, "unverified": "the checkpoint recorded no input digests"}]}
    recorded = ckpt.inputs.get("entries", {})
    methods = {name: e["method"] for name, e in recorded.items() if e.get("method")}
    current = run_inputs.input_entries(config, methods)
    changes, notes = run_inputs.compare(recorded, current)
    for note in notes:
        print(f"fedlora: note: could not verify {note}", flush=True)
    refused = [c for c in changes if c["kind"] not in allowed]
    if refused:
        kinds = sorted({c["kind"] for c in changes})
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: the run's inputs changed since round {ckpt.round} was saved: "
            f"{'; '.join(run_inputs.describe(c) for c in refused)}. Put back the files the run used, or pass "
            f"resume_allow_changed=[{','.join(kinds)}] to continue with the changed {' and '.join(kinds)} (recorded in "
            "the run's checkpoints), or start a new run"
        )
    record = {"round": ckpt.round, "entries": current, "changes": list(ckpt.inputs.get("changes", []))}
    if changes:
        kinds = sorted({c["kind"] for c in changes})
        flag = f"resume_allow_changed=[{','.join(kinds)}]"
        print(f"fedlora: {flag}: continuing after round {ckpt.round} with changed inputs: "
              f"{'; '.join(run_inputs.describe(c) for c in changes)}; recorded in the run's checkpoints "
              f"(inputs.changes in {CHECKPOINT_MANIFEST_FILE})", flush=True)
        record["changes"].append({"after_round": ckpt.round, "seen_at_round": ckpt.round, "allowed_by": flag,
                                  "items": changes})
    return record


def prepare_resume(run_dir: str | Path, config: dict[str, Any]) -> Checkpoint:
    """The newest checkpoint of ``run_dir``, verified and checked against ``config`` and the
    run's input files (:func:`verify_inputs`; ``ckpt.inputs`` becomes the record to continue
    with). Reads only: on any problem it raises :class:`CheckpointError` and the run directory is
    as it was."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"resume={run_dir}: no such run directory")
    dirs = round_dirs(run_dir)
    if not dirs:
        raise CheckpointError(
            f"resume={run_dir}: no checkpoint in {run_dir / CHECKPOINTS_DIR} (the run stopped before round 0 was saved, "
            "or it was made by a fedlora without checkpoints); start a new run"
        )
    newest = dirs[-1]
    try:
        ckpt = load_checkpoint(newest)
    except CheckpointError as err:
        fallback = ""
        for older in reversed(dirs[:-1]):
            try:
                load_checkpoint(older)
            except CheckpointError:
                continue
            fallback = (f" The older checkpoint {older.name} verifies: move {newest} out of the way to resume "
                        f"from round {int(older.name[6:])}.")
            break
        raise CheckpointError(f"cannot resume from {newest}: {err}.{fallback or ' No older checkpoint verifies; start a new run.'}") from None
    check_compatible(ckpt, config, run_dir)
    now = ledger_position(run_dir)
    if now["bytes"] < ckpt.ledger["bytes"]:
        raise CheckpointError(
            f"{run_dir / LEDGER_FILE} has {now['bytes']} bytes but had {ckpt.ledger['bytes']} when round {ckpt.round} "
            "was saved: it was truncated or replaced, and the privacy loss it recorded would be forgotten. "
            "Restore it from a backup before resuming"
        )
    ckpt.inputs = verify_inputs(ckpt, config)
    return ckpt


def resume_config(saved: dict[str, Any], composed: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The config of a resumed ``fedlora simulate``: the run's saved ``config.yaml`` with what the
    command line set on top (``overrides`` as Hydra got them: ``num_rounds=5`` sets that key,
    ``strategy=fedex`` every ``strategy.*`` key), so ``fedlora simulate resume=RUN_DIR num_rounds=5``
    needs none of the run's other overrides repeated."""
    keys = {o.lstrip("+~").split("=", 1)[0].split("@", 1)[0] for o in overrides}
    keys = {k for k in keys if k and not k.startswith("hydra")}
    flat_now = _flatten(composed)
    picked = {k: v for k, v in flat_now.items() if any(k == key or k.startswith(key + ".") for key in keys)}
    merged = {**_flatten(saved), **picked}
    merged.update({k: v for k, v in flat_now.items() if k not in merged})  # keys newer than the run
    merged["run_dir"] = picked.get("run_dir", "")  # the run continues where it is now, even if moved
    merged["resume_allow_changed"] = picked.get("resume_allow_changed", [])  # allowed for one resume, never inherited
    if picked.get("client_rank_tiers"):  # the saved config holds earlier tiers expanded into client_ranks
        merged["client_ranks"] = []
    return unflatten(merged)
