"""Writing a run directory: config, per-round metrics, table, summary, plot, manifest, report
(the file names are in :mod:`fedlora.rundir.files`, with the readers).

``metrics.jsonl`` holds one JSON object per round (round 0 = before any training); the console
gets the same rows as a fixed-width table, and ``eval_loss.png`` plots them at the end.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from fedlora.rundir.files import (
    CONFIG_FILE,
    LOSS_PLOT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    PRIVACY_PLOT_FILE,
    PRIVACY_REPORT_MD,
    REPORT_FILE,
    SUMMARY_FILE,
)

COLUMNS = [  # (key, header, format)
    ("round", "round", "{:>5d}"),
    ("clients", "clients", "{:>7d}"),
    ("train_loss", "train_loss", "{:>10.4f}"),
    ("eval_loss", "eval_loss", "{:>9.4f}"),
    ("eval_token_accuracy", "tok_acc", "{:>7.4f}"),
    ("agg_error", "agg_error", "{:>9.2e}"),
    ("bytes_up", "bytes_up", "{:>11}"),
    ("bytes_down", "bytes_down", "{:>11}"),
    ("seconds", "sec", "{:>6.1f}"),
]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in ("fedlora", "torch", "flwr", "transformers", "peft", "datasets", "flwr-datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class RunWriter:
    """Writes a run's outputs; every file is appended or replaced atomically."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()

    def _write_atomic(self, name: str, text: str) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    def write_config(self, config: dict[str, Any]) -> Path:
        return self._write_atomic(CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        return self._write_atomic(name, json.dumps(data, indent=2, default=str))

    def write_manifest(self, run_manifest: dict[str, Any]) -> Path:
        """``manifest.json``: what :func:`manifest` returns."""
        return self.write_json(MANIFEST_FILE, run_manifest)

    def restore(self, rows: list[dict[str, Any]], wall_seconds: float) -> None:
        """Continue a run from a checkpoint: its metrics rows (``metrics.jsonl`` is replaced, durably,
        so rows written after the checkpoint are dropped) and its wall clock so far."""
        self.rows = list(rows)
        tmp = self.metrics_path.with_suffix(f"{self.metrics_path.suffix}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)
        self.started = time.time() - wall_seconds

    def log_round(self, row: dict[str, Any]) -> None:
        """Append one round to ``metrics.jsonl`` and print it as a table row."""
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if len(self.rows) == 1:
            print(self.table_header(), flush=True)
        print(self.table_row(row), flush=True)

    @staticmethod
    def table_header() -> str:
        head = " | ".join(f"{h:>{len(fmt.format(0) if 'd' in fmt else fmt.format(0.0))}}" for _, h, fmt in COLUMNS)
        return head + "\n" + "-" * len(head)

    @staticmethod
    def table_row(row: dict[str, Any]) -> str:
        cells = []
        for key, header, fmt in COLUMNS:
            width = len(fmt.format(0) if "d" in fmt else fmt.format(0.0))
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append(f"{'-':>{width}}")
            elif key.startswith("bytes"):
                cells.append(f"{human_bytes(value):>{width}}")
            else:
                cells.append(fmt.format(value))
        return " | ".join(cells)

    def write_summary(self, extra: dict[str, Any], planned_rounds: int | None = None) -> Path:
        """``summary.json``: first and final values, each final one with the round it is from,
        how the rounds went (:func:`completion`), totals, versions, and ``extra``."""
        evaluated = [r for r in self.rows if r.get("eval_loss") is not None]
        first, last = (evaluated[0], evaluated[-1]) if evaluated else ({}, {})
        trained = [r for r in self.rows if r.get("train_loss") is not None]
        summary = {
            "rounds": max((r["round"] for r in self.rows), default=0),
            **completion(self.rows, planned_rounds),
            "initial_eval_loss": first.get("eval_loss"),
            "final_eval_loss": last.get("eval_loss"),
            "final_eval_round": last.get("round"),
            "initial_eval_token_accuracy": first.get("eval_token_accuracy"),
            "final_eval_token_accuracy": last.get("eval_token_accuracy"),
            "final_train_loss": trained[-1]["train_loss"] if trained else None,
            "final_train_round": trained[-1]["round"] if trained else None,
            "total_bytes_up": sum(r.get("bytes_up", 0) for r in self.rows),
            "total_bytes_down": sum(r.get("bytes_down", 0) for r in self.rows),
            "wall_seconds": round(time.time() - self.started, 1),
            "versions": versions(),
            **extra,
        }
        if extra.get("skipped_data_rows"):
            n = extra["skipped_data_rows"]
            summary["caveats"].append(f"{n} data row{'s' if n > 1 else ''} left out (dataset.bad_rows=skip; "
                                      f"see the log, or rerun with dataset.bad_rows=error to have them listed)")
        return self.write_json(SUMMARY_FILE, summary)

    def plot(self) -> Path | None:
        """``eval_loss.png``: eval and train loss per round."""
        rows = [r for r in self.rows if r.get("eval_loss") is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["round"] for r in rows], [r["eval_loss"] for r in rows], "o-", label="eval loss (server)")
        train = [r for r in self.rows if r.get("train_loss") is not None]
        ax.plot([r["round"] for r in train], [r["train_loss"] for r in train], "s--", label="train loss (clients)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (response tokens)")
        ax.set_title(f"{self.rows[0].get('strategy', '')}: loss per round")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.dir / LOSS_PLOT_FILE
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def completion(rows: list[dict[str, Any]], planned_rounds: int | None = None) -> dict[str, Any]:
    """How a run's rounds went, from its ``metrics.jsonl`` rows (round 0 is the start, not a round):

    ``planned_rounds`` (default: the last round recorded), ``completed_rounds`` (rounds that
    produced a new global adapter), ``skipped_rounds`` (the rounds too few usable replies left
    unaggregated: the previous adapter stayed), ``rejected_replies`` (over all rounds; node
    discovery's ``node_warnings`` count among the caveats) and
    ``caveats``: one sentence per way the run falls short of a clean run (empty when it does not),
    which ``report.md`` and ``fedlora compare`` show beside its numbers."""
    rounds = [r for r in rows if r.get("round", 0) > 0]
    planned = planned_rounds if planned_rounds is not None else max((r["round"] for r in rounds), default=0)
    skipped = [r["round"] for r in rounds if r.get("skipped")]
    completed = len(rounds) - len(skipped)
    rejected = sum(int(r.get("rejected") or 0) for r in rounds)
    caveats = []
    if skipped:
        caveats.append(f"round{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))} skipped "
                       f"(too few usable replies; the previous global adapter stayed)")
    if rejected:
        caveats.append(f"{rejected} client repl{'ies' if rejected > 1 else 'y'} rejected "
                       f"(see rejected_reasons in {METRICS_FILE})")
    warned = sum(len(r.get("node_warnings") or []) for r in rows)
    if warned:
        caveats.append(f"{warned} node warning{'s' if warned > 1 else ''} (e.g. a partition no node holds; "
                       f"see node_warnings in {METRICS_FILE})")
    if len(rounds) < planned:
        caveats.append(f"{len(rounds)} of {planned} planned rounds ran")
    return {"planned_rounds": planned, "completed_rounds": completed, "skipped_rounds": skipped,
            "rejected_replies": rejected, "caveats": caveats}


def git_commit(path: Path) -> str | None:
    """The commit of the source tree at ``path`` (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def sha256_json(data: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def manifest(config: dict[str, Any], partition_stats: dict[str, Any], device: str) -> dict[str, Any]:
    """What it takes to reproduce a run: versions, source commit, config and partition hashes, seeds."""
    return {
        "versions": versions(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "config_sha256": sha256_json({k: v for k, v in config.items() if k != "run_dir"}),  # where ≠ what
        "partition_sha256": sha256_json(partition_stats),
        "seeds": {"run": config.get("seed"), "adapter_init": config.get("adapter", {}).get("init_seed"),
                  "data": config.get("dataset", {}).get("seed")},
        "device": device,
        "platform": platform.platform(),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The per-round table as Markdown; a ``rejected`` column and a ``note`` marking skipped rounds
    appear when any round had them."""
    keys = [k for k, _, _ in COLUMNS] + [k for k in ("rejected", "client_eval_loss", "epsilon")
                                         if any(r.get(k) for r in rows)]
    noted = any(r.get("skipped") for r in rows)
    header = keys + (["note"] if noted else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("–" if v is None else human_bytes(v) if k.startswith("bytes") else
                         f"{v:.4g}" if isinstance(v, float) else str(v))
        if noted:
            cells.append("**skipped**: previous adapter kept" if r.get("skipped") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, config: dict[str, Any], partitions: str, rows: list[dict[str, Any]],
                 summary: dict[str, Any], run_manifest: dict[str, Any]) -> Path:
    """``report.md``: what ran, on which data split, what happened each round, how to reproduce it.
    ``partitions`` is the partition table as printed at the start of the run; ``summary`` is what
    :meth:`RunWriter.write_summary` wrote (its completion counts and caveats head the report)."""
    planned, final_round = summary["planned_rounds"], summary.get("final_eval_round")
    parts = [
        f"# fedlora run `{run_dir.name}`",
        f"Strategy **{summary.get('strategy')}** on **{summary.get('model')}** / **{summary.get('dataset')}**, "
        f"{summary['completed_rounds']} of {planned} rounds completed; "
        f"eval loss {summary.get('initial_eval_loss'):.4f} → {summary.get('final_eval_loss'):.4f}"
        f"{f' (after round {final_round})' if final_round != planned else ''}; "
        f"{human_bytes(summary.get('total_bytes_up', 0))} up, {human_bytes(summary.get('total_bytes_down', 0))} down.",
    ]
    if summary["caveats"]:
        parts.append("> **Not a clean run**: " + "; ".join(summary["caveats"]) + ".")
    parts += [
        "## Rounds", markdown_table(rows), f"![loss per round]({LOSS_PLOT_FILE})",
        "## Partitions", "```", partitions, "```",
    ]
    if (run_dir / PRIVACY_REPORT_MD).is_file():
        parts += ["## Privacy", f"See [{PRIVACY_REPORT_MD}]({PRIVACY_REPORT_MD}).", f"![epsilon]({PRIVACY_PLOT_FILE})"]
    parts += ["## Configuration", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```",
              "## Reproducibility", "```json", json.dumps(run_manifest, indent=2), "```"]
    path = run_dir / REPORT_FILE
    path.write_text("\n\n".join(parts) + "\n")
    return path
