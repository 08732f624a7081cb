"""Split the training rows across simulated clients with flwr-datasets partitioners.

* ``iid``: :class:`~flwr_datasets.partitioner.IidPartitioner` over the rows shuffled with
  ``dataset.seed`` (the partitioner itself cuts contiguous shards, and ``FederatedDataset``, which
  we don't use for a local ``Dataset``, would shuffle first too). Sizes differ by at most one.
* ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` (Yurochkin et al., 2019,
  arXiv:1905.12022) over the label column ``partition_by``: each label's rows are split across
  clients with proportions drawn from Dir(alpha); small alpha → each client sees few labels.
* ``natural``: :class:`~flwr_datasets.partitioner.NaturalIdPartitioner`, one client per distinct
  value of ``partition_by`` (e.g. a user or source id), clients ordered by sorted value.

The label column for ``dirichlet`` (and the statistics) is prepared first:

* ``partition_by="answer_steps"``, when the data has no such column, is derived: the number of
  non-empty lines of the response field. GSM8K answers hold one reasoning step per line plus the
  final ``#### N`` line, so this is "reasoning steps + 1" (3 to 12 on the GSM8K test file), a
  difficulty proxy that gives a label-skewed split of a dataset without labels.
* A numeric column with more than ``num_buckets`` distinct values is cut into ``num_buckets``
  quantile buckets (``pandas.qcut``) in a new column ``<partition_by>_bucket``; ties can merge
  buckets, so there may be fewer (GSM8K's ``answer_steps`` gives 3 buckets for 4). A numeric
  column with fewer values, or a text column of at most :data:`MAX_TEXT_LABELS` values, is used
  as is. Free text (GSM8K's ``answer``) is refused with a :class:`~fedlora.data.records.DataError`.

Derived and bucket columns stay in the returned partitions (training reads only the prompt and
response fields), so :func:`partition_stats` can report per-client histograms. ``partition_by``
may be set with ``iid`` too: it then only feeds those histograms.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from fedlora.config import DatasetConfig
from fedlora.data.records import DataError
from fedlora.rundir.files import PARTITION_STATS_FILE

ANSWER_STEPS = "answer_steps"
"""Derived ``partition_by`` column: number of non-empty lines in the response field."""
MAX_TEXT_LABELS = 100
"""A text column with more distinct values than this is free text, not a label to split by."""
BUCKET_SUFFIX = "_bucket"
DIRICHLET_MAX_MIN_SIZE = 10
"""flwr-datasets' default ``min_partition_size``; we lower it for small data (see below)."""


def partition_dataset(
    ds: datasets.Dataset, cfg: DatasetConfig, num_partitions: int
) -> list[datasets.Dataset]:
    """Split ``ds`` into ``num_partitions`` client datasets as ``cfg.partitioner`` says.

    Every returned partition is non-empty. Raises :class:`~fedlora.data.records.DataError` (before any
    work) for too few rows, an unknown or unusable ``partition_by`` column, a ``natural`` value
    count that differs from ``num_partitions``, and a Dirichlet draw that keeps leaving a client
    too small.
    """
    if num_partitions < 1:
        raise DataError(f"num_partitions={num_partitions} must be at least 1")
    if len(ds) < num_partitions:
        raise DataError(
            f"the training data has {len(ds)} rows but there are {num_partitions} clients, so some "
            f"client would get no data; reduce num_clients or lower dataset.eval_size / use more data"
        )
    ds, label = _prepare_label_column(ds, cfg)
    partitioner = _make_partitioner(ds, cfg, label, num_partitions)
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings():
            # DirichletPartitioner warns on every redraw; we turn its final failure into a DataError.
            warnings.simplefilter("ignore", UserWarning)
            partitions = [partitioner.load_partition(i) for i in range(num_partitions)]
    except ValueError as err:
        if cfg.partitioner != "dirichlet":
            raise
        raise DataError(
            f"Dirichlet partitioning of {len(ds)} rows over {label!r} into {num_partitions} clients "
            f"with alpha={cfg.dirichlet_alpha} left a client with fewer than "
            f"{_dirichlet_min_size(len(ds), num_partitions)} rows in 10 draws ({err}); "
            f"raise dataset.dirichlet_alpha, reduce num_clients or use more data"
        ) from err
    empty = [i for i, p in enumerate(partitions) if len(p) == 0]
    if empty:  # cannot happen with the checks above; kept so a partitioner change cannot go unseen
        raise DataError(f"clients {empty} received no rows; reduce num_clients")
    return partitions


def _make_partitioner(ds: datasets.Dataset, cfg: DatasetConfig, label: str | None, k: int) -> Partitioner:
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=k)
    assert label is not None  # DatasetConfig requires partition_by for dirichlet and natural
    if cfg.partitioner == "natural":
        values = ds.unique(label)
        if len(values) != k:
            raise DataError(
                f"dataset.partitioner=natural makes one client per distinct value of {label!r}: "
                f"the data has {len(values)} distinct values but num_clients={k}; "
                f"set num_clients={len(values)} or choose another dataset.partition_by"
            )
        return NaturalIdPartitioner(partition_by=label)
    if not cfg.dirichlet_alpha > 0:
        raise DataError(f"dataset.dirichlet_alpha={cfg.dirichlet_alpha} must be positive (e.g. 0.5)")
    return DirichletPartitioner(
        num_partitions=k,
        partition_by=label,
        alpha=float(cfg.dirichlet_alpha),
        min_partition_size=_dirichlet_min_size(len(ds), k),
        self_balancing=False,
        shuffle=True,
        seed=cfg.seed,
    )


def _dirichlet_min_size(rows: int, k: int) -> int:
    """Smallest client the Dirichlet draw may produce: flwr's default 10, but never more than a
    quarter of an even share (so small datasets stay partitionable), and at least 1."""
    return max(1, min(DIRICHLET_MAX_MIN_SIZE, rows // (4 * k)))


def _prepare_label_column(ds: datasets.Dataset, cfg: DatasetConfig) -> tuple[datasets.Dataset, str | None]:
    """Shuffle for iid; derive ``answer_steps``; bucket a numeric column; return the label column."""
    if cfg.partitioner == "iid":
        ds = ds.shuffle(seed=cfg.seed, keep_in_memory=True)
    column = cfg.partition_by
    if column is None:
        return ds, None
    if column == ANSWER_STEPS and column not in ds.column_names:
        if cfg.response_field not in ds.column_names:
            raise DataError(
                f"partition_by={ANSWER_STEPS} counts lines of the response column "
                f"{cfg.response_field!r}, which is missing; its columns are {ds.column_names}"
            )
        field = cfg.response_field
        ds = ds.map(
            lambda batch: {column: [_count_lines(text) for text in batch[field]]},
            batched=True,
            keep_in_memory=True,
        )
    if column not in ds.column_names:
        raise DataError(
            f"dataset.partition_by={column!r} is not a column of the data; its columns are "
            f"{ds.column_names} (or {ANSWER_STEPS}, derived from the response); set "
            f"dataset.partition_by=<column>"
        )
    feature = ds.features[column]
    if not isinstance(feature, datasets.Value):
        raise DataError(
            f"dataset.partition_by={column!r} holds {feature}, not single values; choose a column "
            f"of numbers or short labels"
        )
    values = ds.unique(column)
    if None in values:
        raise DataError(f"column {column!r} has empty values; fill them or choose another partition_by")
    if cfg.partitioner == "natural":
        return ds, column
    numeric = feature.dtype.startswith(("int", "uint", "float"))
    if numeric and len(values) > cfg.num_buckets:
        if cfg.num_buckets < 1:
            raise DataError(f"dataset.num_buckets={cfg.num_buckets} must be at least 1")
        bucket_column = column + BUCKET_SUFFIX
        buckets = pd.qcut(list(ds[column]), q=cfg.num_buckets, labels=False, duplicates="drop")
        ds = ds.add_column(bucket_column, [int(b) for b in buckets])
        return ds, bucket_column
    if not numeric and len(values) > MAX_TEXT_LABELS:
        raise DataError(
            f"dataset.partition_by={column!r} is text with {len(values)} distinct values, not a "
            f"label to split by; use partition_by={ANSWER_STEPS} (lines of the response), a numeric "
            f"column (bucketed into dataset.num_buckets quantiles) or a column of at most "
            f"{MAX_TEXT_LABELS} labels"
        )
    return ds, column


def _count_lines(text: Any) -> int:
    return sum(1 for line in str(text or "").splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------
# statistics


def _label_column(partitions: list[datasets.Dataset], cfg: DatasetConfig) -> str | None:
    """The column the histograms count: the bucket column when there is one."""
    if cfg.partition_by is None or not partitions:
        return None
    columns = partitions[0].column_names
    for candidate in (cfg.partition_by + BUCKET_SUFFIX, cfg.partition_by):
        if candidate in columns:
            return candidate
    return None


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def partition_stats(partitions: list[datasets.Dataset], cfg: DatasetConfig) -> dict[str, Any]:
    """Per-client sizes and label histograms, JSON-serialisable.

    ``clients[i]`` has ``examples`` and, when partitioning by a column, ``histogram`` (label →
    count) and ``tv_distance``: the total-variation distance ½·Σ_y |p_i(y) − p(y)| between the
    client's label distribution and the pooled one (0 = same mix as everyone, → 1 = disjoint
    labels). ``mean_tv_distance`` averages it over clients: a single skew number per split.
    Histogram keys are strings (JSON); for bucketed columns ``bucket_ranges`` gives each bucket's
    [min, max] of the source column.
    """
    label = _label_column(partitions, cfg)
    sizes = [len(p) for p in partitions]
    stats: dict[str, Any] = {
        "partitioner": cfg.partitioner,
        "partition_by": label,
        "num_partitions": len(partitions),
        "total_examples": sum(sizes),
        "min_examples": min(sizes, default=0),
        "max_examples": max(sizes, default=0),
        "clients": [{"client": i, "examples": n} for i, n in enumerate(sizes)],
    }
    if label is None:
        return stats

    counts = [Counter(p[label]) for p in partitions]
    labels = sorted({y for c in counts for y in c}, key=_sort_key)
    total = {y: sum(c.get(y, 0) for c in counts) for y in labels}
    n = sum(sizes)
    for entry, c, size in zip(stats["clients"], counts, sizes, strict=True):
        entry["histogram"] = {str(y): int(c.get(y, 0)) for y in labels}
        entry["tv_distance"] = (
            0.5 * sum(abs(c.get(y, 0) / size - total[y] / n) for y in labels) if size else 0.0
        )
    stats["histogram_total"] = {str(y): int(total[y]) for y in labels}
    stats["mean_tv_distance"] = sum(e["tv_distance"] for e in stats["clients"]) / len(partitions)

    source = cfg.partition_by
    if label.endswith(BUCKET_SUFFIX) and source in partitions[0].column_names:
        ranges: dict[str, list[Any]] = {}
        for p in partitions:
            for bucket, value in zip(p[label], p[source], strict=True):
                lo, hi = ranges.get(str(bucket), [value, value])
                ranges[str(bucket)] = [min(lo, value), max(hi, value)]
        stats["bucket_ranges"] = dict(sorted(ranges.items(), key=lambda kv: int(kv[0])))
    return stats


def format_partition_stats(stats: dict[str, Any], max_labels: int = 12) -> str:
    """A small console table: one row per client, one column per label (up to ``max_labels``)."""
    head = (
        f"partitioner={stats['partitioner']}  by={stats['partition_by']}  "
        f"clients={stats['num_partitions']}  examples={stats['total_examples']}"
    )
    if "bucket_ranges" in stats:
        head += "  buckets: " + ", ".join(
            f"{b}=[{lo}..{hi}]" for b, (lo, hi) in stats["bucket_ranges"].items()
        )
    labels = list(stats.get("histogram_total", {}))
    shown = labels if len(labels) <= max_labels else []
    columns = ["client", "examples", *shown] + (["TV"] if labels else [])
    rows: list[list[str]] = []
    for entry in stats["clients"]:
        row = [str(entry["client"]), str(entry["examples"])]
        row += [str(entry["histogram"][y]) for y in shown]
        if labels:
            row.append(f"{entry['tv_distance']:.2f}")
        rows.append(row)
    total_row = ["total", str(stats["total_examples"])] + [str(stats["histogram_total"][y]) for y in shown]
    if labels:
        total_row.append(f"{stats['mean_tv_distance']:.2f}")  # mean TV in the total row
    rows.append(total_row)
    widths = [max(len(columns[j]), *(len(r[j]) for r in rows)) for j in range(len(columns))]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    if labels and not shown:
        lines.append(
            f"({len(labels)} distinct {stats['partition_by']} values: histograms in {PARTITION_STATS_FILE})"
        )
    return "\n".join(lines)


def save_partition_stats(stats: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``<run_dir>/partition_stats.json`` and return its path."""
    path = Path(run_dir) / PARTITION_STATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2, sort_keys=False) + "\n")
    return path
