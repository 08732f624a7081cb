"""``fedlora compare``: finished runs side by side — a Markdown and a CSV table and PNG plots.

    fedlora compare RUN_DIR... [--out DIR] [--skip-incomplete]

Each RUN_DIR is a run directory (what ``fedlora simulate`` writes: ``config.yaml``,
``metrics.jsonl``, ``summary.json``) or any folder above run directories, such as a ``--multirun``
sweep directory; run directories are found recursively. Writes to ``--out`` (default: the deepest
folder holding every RUN_DIR):

* ``compare.md`` / ``compare.csv``: one row per run — strategy, client ranks, DP mode and the ε
  spent, Dirichlet α, final eval loss, accuracy when the run measured it, total bytes up and down,
  wall time, and the Hydra overrides that tell the runs of a sweep apart;
* ``compare_eval_loss.png``: held-out loss per round, one line per run;
* ``compare_metric_vs_bytes.png``: final eval loss (and accuracy) against total bytes on the wire,
  with the Pareto front (nothing else is both cheaper and better) marked;
* ``compare_epsilon.png``: ε spent per round, and ``compare_privacy.png``: final metric against the
  ε spent (the same strategy without DP dashed), when any run used DP.

Eval losses are comparable only over the same held-out data, so runs over different datasets are
refused.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fedlora.rundir.files import (
    CONFIG_FILE,
    HYDRA_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    RunDirError,
    read_config,
    read_hydra_overrides,
    read_metrics,
    read_summary,
)
from fedlora.rundir.writer import completion, human_bytes

METRICS = [  # (name, axis label, higher is better)
    ("loss", "final eval loss (lower is better)", False),
    ("token_accuracy", "final eval token accuracy (higher is better)", True),
    ("accuracy", "GSM8K accuracy (higher is better)", True),
]
"""What the Pareto fronts are drawn for; the accuracies only when every run reports them."""

REQUIRED = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
"""What every finished run directory holds (see :mod:`fedlora.rundir.writer`)."""

COLUMNS = ["run", "strategy", "ranks", "dp", "epsilon", "alpha", "rounds", "final_eval_loss", "token_accuracy",
           "gsm8k_accuracy", "total_bytes_up", "total_bytes_down", "wall_seconds", "overrides"]
"""The columns of ``compare.md``; ``compare.csv`` has these and a few more (see :func:`csv_row`)."""


class CompareError(ValueError):
    """The runs cannot be compared; the message names the run or file and the fix."""


class IncompleteRunError(CompareError):
    """A run directory lacks some of :data:`REQUIRED`: the run failed or is still going."""


@dataclass
class Run:
    """One finished run as read from its directory."""

    dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    overrides: list[str] = field(default_factory=list)
    """The Hydra overrides it ran with (``.hydra/overrides.yaml``), when Hydra wrote them."""
    label: str = ""

    @property
    def strategy(self) -> str:
        return str(self.summary.get("strategy") or self.config.get("strategy", {}).get("name", "?"))

    @property
    def ranks(self) -> str:
        ranks = self.summary.get("client_ranks") or self.config.get("client_ranks") or [self.config.get("adapter", {}).get("rank")]
        return str(ranks[0]) if len(set(ranks)) == 1 else "/".join(map(str, ranks))

    @property
    def dp(self) -> str:
        return str(self.config.get("dp", {}).get("mode", "none"))

    @property
    def epsilon(self) -> float | None:
        """ε spent by the end (worst client), from the last round that reports it."""
        spent = [r["epsilon"] for r in self.rows if r.get("epsilon") is not None]
        return spent[-1] if spent else None

    @property
    def alpha(self) -> str:
        data = self.config.get("dataset", {})
        return str(data.get("dirichlet_alpha")) if data.get("partitioner") == "dirichlet" else str(data.get("partitioner", "iid"))

    @property
    def accuracy(self) -> float | None:
        """GSM8K exact match of generated answers (``eval.gsm8k_problems`` > 0)."""
        return (self.summary.get("gsm8k") or {}).get("accuracy")

    @property
    def token_accuracy(self) -> float | None:
        """Greedy next-token accuracy on the held-out response tokens after the last round."""
        return self.summary.get("final_eval_token_accuracy")

    @cached_property
    def completion(self) -> dict[str, Any]:
        """Completed / skipped rounds, rejected replies and caveats (:func:`fedlora.rundir.writer.completion`),
        counted from ``metrics.jsonl`` so that runs written before the summary held them are judged too;
        the summary's caveats where it has them (they also name data rows ``dataset.bad_rows=skip`` left out)."""
        done = completion(self.rows, self.summary.get("planned_rounds") or self.config.get("num_rounds"))
        return done | {"caveats": list(self.summary.get("caveats", done["caveats"]))}

    @property
    def final_eval_round(self) -> int | None:
        """The round the final eval loss is from (the last one that evaluated)."""
        evaluated = [r["round"] for r in self.rows if r.get("eval_loss") is not None]
        return evaluated[-1] if evaluated else None

    def metric(self, name: str) -> float | None:
        return {"loss": self.summary["final_eval_loss"], "token_accuracy": self.token_accuracy,
                "accuracy": self.accuracy}[name]

    @property
    def total_bytes(self) -> int:
        return int(self.summary["total_bytes_up"]) + int(self.summary["total_bytes_down"])

    @property
    def dataset(self) -> tuple[str, str, Any]:
        """What makes two runs' eval losses comparable: the same file and the same held-out rows."""
        data = self.config.get("dataset", {})
        return str(data.get("name")), str(data.get("path")), data.get("eval_size")


# ---------------------------------------------------------------------------------------------
# finding and reading runs


def _natural(path: Path) -> list:
    """Sort key: multirun job folders 2 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run_dir(path: Path) -> bool:
    # a Hydra job folder (.hydra/) whose run failed before writing anything counts, so it is reported
    return any((path / name).is_file() for name in REQUIRED) or (path / HYDRA_DIR).is_dir()


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories at or below ``paths``, in natural order (a run's own folders are not searched)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise CompareError(f"{path} is not a directory; pass run directories or a --multirun sweep directory")
        if _is_run_dir(path):
            found.append(path)
            continue
        for root, dirs, _ in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if _is_run_dir(Path(root)) and Path(root) != path:
                found.append(Path(root))
                dirs[:] = []  # a run holds no other runs (adapter/ …)
    if not found:
        raise CompareError(
            f"no runs found under {', '.join(map(str, paths))}: a run directory holds {', '.join(REQUIRED)} "
            "(what `fedlora simulate` writes); pass run directories or a --multirun sweep directory"
        )
    return sorted(dict.fromkeys(p.resolve() for p in found), key=_natural)


def load_run(path: Path) -> Run:
    """Read one run directory; a missing or unreadable file raises :class:`CompareError` naming it."""
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise IncompleteRunError(
            f"run {path} lacks {', '.join(missing)}: it failed or is still running. Rerun it, leave it out, "
            "or pass --skip-incomplete to compare the others"
        )
    try:
        config = read_config(path)
        summary = read_summary(path)
        rows = read_metrics(path)
        overrides = read_hydra_overrides(path)
    except RunDirError as err:
        raise CompareError(f"{err}; rerun that run or leave it out") from None
    for key in ("final_eval_loss", "total_bytes_up", "total_bytes_down"):
        if summary.get(key) is None:
            raise CompareError(f"{path / SUMMARY_FILE} has no {key}; rerun that run or leave it out")
    if not rows:
        raise CompareError(f"{path / METRICS_FILE} holds no rounds; the run did not get past its start: rerun it or "
                           "leave it out")
    return Run(path, config, summary, rows, overrides)


def load_runs(paths: list[str | Path], skip_incomplete: bool = False) -> list[Run]:
    """Find, read and label the runs under ``paths``; all must share one dataset."""
    runs = []
    for path in find_runs(paths):
        try:
            runs.append(load_run(path))
        except IncompleteRunError as err:
            if not skip_incomplete:
                raise
            print(f"fedlora: skipping {path}: {err}")
    if not runs:
        raise CompareError(f"every run under {', '.join(map(str, paths))} is incomplete; nothing to compare")
    check_same_dataset(runs)
    root = Path(os.path.commonpath([r.dir for r in runs]))
    # The overrides every run shares (+experiment=…, model=tiny) say nothing about the difference.
    common = set.intersection(*(set(r.overrides) for r in runs))
    for run in runs:
        run.label = str(run.dir.relative_to(root)) if run.dir != root else run.dir.name
        run.overrides = [o for o in run.overrides if o not in common]
    return runs


def check_same_dataset(runs: list[Run]) -> None:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.dataset, []).append(run)
    if len(groups) > 1:
        lines = [f"  {name} ({path}, {eval_size} held-out rows): {', '.join(str(r.dir) for r in members)}"
                 for (name, path, eval_size), members in groups.items()]
        raise CompareError(
            "the runs use different datasets, so their eval losses are not comparable:\n" + "\n".join(lines)
            + "\ncompare the runs of one dataset at a time (fedlora compare RUN_DIR… with the runs of one line above)"
        )


# ---------------------------------------------------------------------------------------------
# tables


def pareto_front(costs: list[float], values: list[float], maximize: bool) -> list[int]:
    """Indices of the points no other point beats: cheaper-or-equal cost and better-or-equal
    value, strictly better in one."""
    sign = -1.0 if maximize else 1.0  # compare as "lower is better"
    front = []
    for i, (c, v) in enumerate(zip(costs, values)):
        dominated = any(
            c2 <= c and sign * v2 <= sign * v and (c2 < c or sign * v2 < sign * v)
            for j, (c2, v2) in enumerate(zip(costs, values)) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def csv_row(run: Run, fronts: dict[str, set[int]], index: int) -> dict[str, Any]:
    """All of a run's numbers at full precision."""
    s = run.summary
    return {
        "run": run.label, "strategy": run.strategy, "ranks": run.ranks, "dp": run.dp, "epsilon": run.epsilon,
        "target_epsilon": run.config.get("dp", {}).get("target_epsilon"),
        "noise_multiplier": run.config.get("dp", {}).get("noise_multiplier"),
        "alpha": run.alpha, "rounds": s.get("rounds"), "completed_rounds": run.completion["completed_rounds"],
        "skipped_rounds": " ".join(map(str, run.completion["skipped_rounds"])),
        "rejected_replies": run.completion["rejected_replies"], "caveats": "; ".join(run.completion["caveats"]),
        "initial_eval_loss": s.get("initial_eval_loss"),
        "final_eval_loss": s["final_eval_loss"], "final_eval_round": run.final_eval_round, "token_accuracy": run.token_accuracy, "gsm8k_accuracy": run.accuracy,
        "total_bytes_up": s["total_bytes_up"], "total_bytes_down": s["total_bytes_down"],
        "wall_seconds": s.get("wall_seconds"),
        **{f"pareto_{name}": index in fronts[name] if name in fronts else None for name, _, _ in METRICS},
        "model": s.get("model"), "dataset": run.dataset[0], "overrides": " ".join(run.overrides),
        "run_dir": str(run.dir),
    }


def markdown(runs: list[Run], fronts: dict[str, set[int]], plots: list[str]) -> str:
    def cell(value: Any, fmt: str = "{}") -> str:
        return "–" if value is None else fmt.format(value)

    lines = ["# fedlora compare", "",
             f"{len(runs)} runs on {runs[0].dataset[0]} ({runs[0].dataset[1]}). Bytes are serialised payloads, "
             "summed over all rounds and clients; ε is the worst client's at the end; "
             "α is the Dirichlet concentration (iid: no skew); ★ marks the Pareto front of a metric "
             "against total bytes (no other run is both cheaper and better); rounds are completed of "
             "planned, ⚠ marks a run with skipped rounds or rejected replies (see the notes below the "
             "table), and a final eval loss from an earlier round than the last names it (rN).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for i, run in enumerate(runs):
        s = run.summary
        gsm = s.get("gsm8k") or {}

        def star(name: str) -> str:
            return " ★" if i in fronts.get(name, ()) else ""

        done = run.completion
        rounds = f"{done['completed_rounds']}/{done['planned_rounds']}" + (" ⚠" if done["caveats"] else "")
        final = f"{s['final_eval_loss']:.4f}" + (f" (r{run.final_eval_round})"
                                                  if run.final_eval_round != done["planned_rounds"] else "")
        cells = [run.label, run.strategy, run.ranks, run.dp, cell(run.epsilon, "{:.2f}"), run.alpha,
                 rounds, final + star("loss"),
                 cell(run.token_accuracy, "{:.4f}") + star("token_accuracy"),
                 "–" if run.accuracy is None else f"{run.accuracy:.3f} ({gsm.get('correct')}/{gsm.get('total')})"
                 + star("accuracy"),
                 human_bytes(s["total_bytes_up"]), human_bytes(s["total_bytes_down"]),
                 cell(s.get("wall_seconds"), "{:.1f} s"), " ".join(run.overrides) or "–"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"- ⚠ {run.label}: {'; '.join(run.completion['caveats'])}" for run in runs if run.completion["caveats"]]
    if notes:
        lines += ["", "Runs that are not clean (their numbers are not those of a full run):", *notes]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plots


def _legend(run: Run) -> str:
    return f"{run.label}: {' '.join(run.overrides)}" if run.overrides else f"{run.label} ({run.strategy}, r={run.ranks})"


def _point_label(run: Run) -> str:
    """Short tag beside a point: the values of the overrides that set the run apart."""
    return " ".join(o.split("=", 1)[-1] for o in run.overrides) or f"{run.strategy} r={run.ranks}"


def plot(runs: list[Run], out: Path, fronts: dict[str, set[int]]) -> list[str]:
    """The PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def per_round(key: str, ylabel: str, title: str, which: list[Run], path: Path) -> str:
        fig, ax = plt.subplots(figsize=(8, 5))
        for run in which:
            rows = [r for r in run.rows if r.get(key) is not None]
            ax.plot([r["round"] for r in rows], [r[key] for r in rows], "o-", label=_legend(run))
        ax.set(xlabel="round", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return _save(fig, path)

    names = [per_round("eval_loss", "held-out loss (response tokens)", "eval loss per round", runs, out / "compare_eval_loss.png")]

    panels = [(name, label, [r.metric(name) for r in runs]) for name, label, _ in METRICS if name in fronts]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    costs = [r.total_bytes for r in runs]
    for ax, (key, ylabel, values) in zip(axes[0], panels):
        ax.scatter(costs, values, zorder=3)
        for run, c, v in zip(runs, costs, values):
            ax.annotate(_point_label(run), (c, v), textcoords="offset points", xytext=(4, 4), fontsize="small")
        front = sorted(fronts[key], key=lambda i: costs[i])
        ax.step([costs[i] for i in front], [values[i] for i in front], where="post", color="tab:red", alpha=0.6)
        ax.scatter([costs[i] for i in front], [values[i] for i in front], s=160, facecolors="none",
                   edgecolors="tab:red", zorder=4, label="Pareto front")
        ax.set(xscale="log", xlabel="total bytes on the wire (up + down)", ylabel=ylabel)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
        ax.tick_params(axis="x", which="both", labelsize="small", labelrotation=30)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle("final metric against communication")
    names.append(_save(fig, out / "compare_metric_vs_bytes.png"))

    private = [r for r in runs if r.epsilon is not None]
    if private:
        names.append(per_round("epsilon", "ε spent (worst client)", "privacy spent per round", private, out / "compare_epsilon.png"))
        names.append(_privacy_utility(runs, out, fronts, plt))
    plt.close("all")
    return names


def _privacy_utility(runs: list[Run], out: Path, fronts: dict[str, set[int]], plt) -> str:
    """Final metric against the ε spent, one line per strategy and ranks; that pair's run without
    DP (when there is one) as a dashed line of the same colour: what privacy costs."""
    from matplotlib.ticker import FuncFormatter

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(f"{run.strategy} r={run.ranks}", []).append(run)
    panels = [(name, label) for name, label, _ in METRICS if name in fronts]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (name, ylabel) in zip(axes[0], panels):
        for i, (group, members) in enumerate(groups.items()):
            color = f"C{i % 10}"
            private = sorted((r for r in members if r.epsilon is not None), key=lambda r: r.epsilon)
            ax.plot([r.epsilon for r in private], [r.metric(name) for r in private], "o-", color=color, label=group)
            for r in members:
                if r.epsilon is None:
                    ax.axhline(r.metric(name), color=color, linestyle="--", alpha=0.7)
        ax.set(xscale="log", xlabel="ε spent (worst client; dashed: no DP)", ylabel=ylabel)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle("privacy against utility")
    return _save(fig, out / "compare_privacy.png")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path.name


# ---------------------------------------------------------------------------------------------


def compare(paths: list[str | Path], out: str | Path | None = None, skip_incomplete: bool = False) -> dict[str, Path]:
    """Compare the runs under ``paths``; returns the files written."""
    runs = load_runs(paths, skip_incomplete)
    out = Path(out) if out else Path(os.path.commonpath([Path(p).resolve() for p in paths]))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CompareError(f"cannot write to {out} ({err}); pass --out DIR") from None
    costs = [r.total_bytes for r in runs]
    fronts = {name: set(pareto_front(costs, [r.metric(name) for r in runs], maximize))
              for name, _, maximize in METRICS if all(r.metric(name) is not None for r in runs)}
    plots = plot(runs, out, fronts)
    rows = [csv_row(run, fronts, i) for i, run in enumerate(runs)]
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    (out / "compare.md").write_text(markdown(runs, fronts, plots))
    return {"md": out / "compare.md", "csv": out / "compare.csv", **{Path(p).stem: out / p for p in plots}}


def compare_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedlora compare", description="Compare finished fedlora runs.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or sweep directories above them")
    parser.add_argument("--out", help="where compare.md, compare.csv and the PNGs go (default: the folder holding every RUN_DIR)")
    parser.add_argument("--skip-incomplete", action="store_true", help="leave out runs that failed or are still running")
    args = parser.parse_args(argv)
    try:
        written = compare(args.run_dirs, args.out, args.skip_incomplete)
    except CompareError as err:
        raise SystemExit(f"fedlora: error: {err}") from None
    print(written["md"].read_text().split("\n![")[0].rstrip())
    print(f"fedlora: wrote {', '.join(str(p) for p in written.values())}")
