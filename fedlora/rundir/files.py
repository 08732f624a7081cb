"""The run directory's layout in one place: the name of every file and folder a run writes, and
the readers for the files that other modules read back.

A run directory (``RUN_DIR``: what ``fedlora simulate`` or a deployed ServerApp writes) holds::

    config.yaml               CONFIG_FILE            the run's config
    metrics.jsonl             METRICS_FILE           one row per round
    summary.json              SUMMARY_FILE           final figures (written at the end)
    manifest.json             MANIFEST_FILE          what it takes to reproduce the run
    partition_stats.json      PARTITION_STATS_FILE   the clients' data split
    adapter_targets.json      ADAPTER_TARGETS_FILE   the layers adapter.target_modules adapted
    report.md                 REPORT_FILE            the human-readable report
    eval_loss.png             LOSS_PLOT_FILE         loss per round
    global_adapter.pb         GLOBAL_ADAPTER_FILE    the newest global adapter (fedlora.v1.Adapter)
    adapter/                  ADAPTER_DIR            the final adapter as a PEFT LoRA export:
        adapter_model.safetensors  PEFT_WEIGHTS_FILE
        adapter_config.json        PEFT_CONFIG_FILE
    checkpoints/round-NNNNN/  CHECKPOINTS_DIR        server checkpoints (fedlora.rundir.checkpoint):
        state.safetensors     CHECKPOINT_STATE_FILE
        manifest.json         CHECKPOINT_MANIFEST_FILE
    privacy_ledger.jsonl      LEDGER_FILE            the privacy ledger (DP runs only)
    privacy_report.json       PRIVACY_REPORT_JSON    the privacy report (DP runs only)
    privacy_report.md         PRIVACY_REPORT_MD
    epsilon.png               PRIVACY_PLOT_FILE
    clients/<id>/privacy.json CLIENTS_DIR, CLIENT_PRIVACY_FILE  client accountants (simulation, DP)
    .hydra/overrides.yaml     HYDRA_DIR, HYDRA_OVERRIDES_FILE   written by Hydra, not by fedlora

The readers raise :class:`RunDirError` (a ``ValueError``) naming the file when it is missing,
cannot be read or does not hold what it should; callers add the fix that fits their command. This
module imports nothing from fedlora, so every layer can use it (``fedlora.privacy.ledger`` takes
:data:`LEDGER_FILE` from here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# ---------------------------------------------------------------------------------------------
# names

CONFIG_FILE = "config.yaml"
"""The run's whole config as YAML (``config_to_dict``), written before round 1; a resumed run reads it back."""

METRICS_FILE = "metrics.jsonl"
"""One JSON object per round, each with a ``round`` (0 = before any training): losses, bytes, seconds,
ε; appended as each round ends, replaced when a resumed run drops rows past its checkpoint."""

SUMMARY_FILE = "summary.json"
"""Final figures of a finished run: initial/final losses, total bytes, wall time, versions, strategy,
model, dataset, client ranks (:meth:`fedlora.rundir.writer.RunWriter.write_summary`)."""

MANIFEST_FILE = "manifest.json"
"""What it takes to reproduce the run: versions, source commit, config and partition hashes, seeds,
device (:func:`fedlora.rundir.writer.manifest`)."""

PARTITION_STATS_FILE = "partition_stats.json"
"""How the training data was split over the clients: per-client sizes and label histograms
(:func:`fedlora.data.partition.partition_stats`)."""

ADAPTER_TARGETS_FILE = "adapter_targets.json"
"""Which layers ``adapter.target_modules`` adapted in this model, written before round 1: the
architecture, per pattern its kind, count, module types, layer names it resolved to and the
layers, and every adapted layer (:meth:`fedlora.adapters.targets.TargetReport.to_dict`, written
by :func:`fedlora.model.targets.save_target_report`)."""

REPORT_FILE = "report.md"
"""The run's Markdown report: rounds table, partitions, config, reproducibility manifest."""

LOSS_PLOT_FILE = "eval_loss.png"
"""Eval and train loss per round (:meth:`fedlora.rundir.writer.RunWriter.plot`)."""

GLOBAL_ADAPTER_FILE = "global_adapter.pb"
"""The newest global adapter as one serialised ``fedlora.v1.Adapter``, replaced atomically after
every round (:func:`fedlora.protocol.proto_io.write_global_adapter`); what ``fedlora serve`` sends."""

ADAPTER_DIR = "adapter"
"""Folder of the final global adapter as a PEFT LoRA export (``adapter_model.safetensors`` and
``adapter_config.json``), written when the run finishes."""

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
"""In a PEFT export (``adapter/``): the LoRA factors, named as PEFT names them (PEFT's own file name)."""

PEFT_CONFIG_FILE = "adapter_config.json"
"""In a PEFT export: the ``LoraConfig`` (rank, ``lora_alpha``, target modules; PEFT's own file name)."""

CHECKPOINTS_DIR = "checkpoints"
"""Folder of server checkpoints, one ``round-NNNNN/`` folder per saved round (the newest few are kept)."""

CHECKPOINT_STATE_FILE = "state.safetensors"
"""In a checkpoint round folder: every tensor of the server state (global adapter, base terms,
strategy extras, torch RNG states)."""

CHECKPOINT_MANIFEST_FILE = "manifest.json"
"""In a checkpoint round folder: round, config and fingerprint, state structure, RNG states, ledger
length, metrics rows so far, hashes of the state file and of itself."""

LEDGER_FILE = "privacy_ledger.jsonl"
"""The privacy ledger, append-only, one JSON entry per line (``run``, ``example``, ``client_level``;
see :mod:`fedlora.privacy.ledger`); only runs with differential privacy have one."""

PRIVACY_REPORT_JSON = "privacy_report.json"
"""The privacy report recomputed from the ledger, as JSON (:mod:`fedlora.privacy.report`)."""

PRIVACY_REPORT_MD = "privacy_report.md"
"""The same privacy report in Markdown."""

PRIVACY_PLOT_FILE = "epsilon.png"
"""Each client's cumulative ε per round."""

CLIENTS_DIR = "clients"
"""Folder of per-client state in simulation: ``clients/<id>/``."""

CLIENT_PRIVACY_FILE = "privacy.json"
"""In ``clients/<id>/``: that client's privacy accountant, saved before it replies (example-level DP)."""

HYDRA_DIR = ".hydra"
"""Hydra's own folder in a run it launched (not written by fedlora)."""

HYDRA_OVERRIDES_FILE = "overrides.yaml"
"""In ``.hydra/``: the command-line overrides the run was started with."""


class RunDirError(ValueError):
    """A run directory's file is missing, unreadable or does not hold what it should; the message
    names the file (``path``)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path} {message}")
        self.path = path


# ---------------------------------------------------------------------------------------------
# readers


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise RunDirError(path, "does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(path, f"cannot be read ({err})") from None


def _read_mapping_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise RunDirError(path, f"is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config from :data:`CONFIG_FILE` (an empty file is an empty config)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise RunDirError(path, f"is not YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunDirError(path, f"holds a YAML {type(data).__name__}, not a mapping")
    return data


def read_metrics(run_dir: str | Path, *, live: bool = False) -> list[dict[str, Any]]:
    """The rows of :data:`METRICS_FILE` in file order (blank lines skipped).

    ``live=True`` reads a run that may still be going: the text after the last newline (a row being
    appended) is left out, and a missing file is no rows. Otherwise every line must be a row. A line
    that is not a JSON object with a ``round`` raises :class:`RunDirError` naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if live and not path.is_file():
        return []
    lines = _read_text(path).split("\n")
    if live:
        lines = lines[:-1]  # the part after the last newline is unfinished (or empty)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunDirError(path, f"line {number} is not JSON ({err.msg}); the file is damaged") from None
        if not isinstance(row, dict) or "round" not in row:
            raise RunDirError(path, f"line {number} is not a round of metrics (no 'round')")
        rows.append(row)
    return rows


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The finished run's :data:`SUMMARY_FILE`."""
    return _read_mapping_json(Path(run_dir) / SUMMARY_FILE)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's reproducibility :data:`MANIFEST_FILE`."""
    return _read_mapping_json(Path(run_dir) / MANIFEST_FILE)


def read_partition_stats(run_dir: str | Path) -> dict[str, Any]:
    """The clients' data split from :data:`PARTITION_STATS_FILE`."""
    return _read_mapping_json(Path(run_dir) / PARTITION_STATS_FILE)


def read_hydra_overrides(run_dir: str | Path) -> list[str]:
    """The Hydra overrides the run was started with (none when Hydra did not write them)."""
    path = Path(run_dir) / HYDRA_DIR / HYDRA_OVERRIDES_FILE
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise RunDirError(path, f"is not YAML ({err})") from None
    return [str(o) for o in data or []]


# ---------------------------------------------------------------------------------------------
# the privacy ledger's length (for checkpoints; the entries are read by fedlora.privacy.ledger)


def ledger_position(run_dir: str | Path) -> dict[str, int]:
    """Bytes and complete lines of the run's privacy ledger now (zeros when there is none)."""
    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        return {"bytes": 0, "entries": 0}
    data = path.read_bytes()
    return {"bytes": len(data), "entries": data.count(b"\n")}


def ledger_entries_since(run_dir: str | Path, position: dict[str, int]) -> int:
    """Client and server privacy entries (not ``run`` entries) appended after ``position``."""
    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        f.seek(position["bytes"])
        tail = f.read().decode(errors="replace")
    count = 0
    for line in tail.splitlines():
        try:
            count += json.loads(line).get("kind") != "run"
        except (json.JSONDecodeError, AttributeError):
            continue
    return count
