"""The run's privacy ledger: ``<run_dir>/privacy_ledger.jsonl``, append-only.

One JSON object per line, each with a ``kind``:

- ``run`` — the run's DP settings (written at every server start; the last one wins);
- ``example`` — one client's round under example-level DP (trained or declined), carrying the
  client's whole composition history *after* that round, so the latest entry per client is enough
  to recompute its ε with Opacus alone;
- ``client_level`` — one server release under client-level DP, with the server's history.

Appends are one ``write`` on an ``O_APPEND`` descriptor followed by ``fsync``; the file is never
opened for writing in any other mode, so a resumed run can only add lines. A line torn by a crash
is skipped (with a warning) when reading, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import FedloraConfig
from fedlora.privacy.accounting import AccountantState, PrivacyError
from fedlora.rundir.files import LEDGER_FILE

logger = logging.getLogger(__name__)

KINDS = ("run", "example", "client_level")


def ledger_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEDGER_FILE


def append_entry(run_dir: str | Path, entry: dict[str, Any]) -> None:
    """Append one entry (a JSON-ready dict with a ``kind``) durably."""
    if entry.get("kind") not in KINDS:
        raise PrivacyError(f"ledger entry kind {entry.get('kind')!r} must be one of {KINDS}")
    line = json.dumps({"time": round(time.time(), 3), **entry}, sort_keys=True)
    if "\n" in line:
        raise PrivacyError("a ledger entry must serialise to one line")
    path = ledger_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        prefix = b""
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:  # a crash may have left a torn last line: never glue onto it
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    prefix = b"\n"
        os.write(fd, prefix + line.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_ledger(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable entry in file order; raises :class:`PrivacyError` when there is no ledger."""
    path = ledger_path(run_dir)
    if not path.exists():
        raise PrivacyError(f"no privacy ledger at {path}: was the run made with dp.mode=example or dp.mode=client?")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is torn (a crash mid-write?); skipped", path, number)
    return entries


# ---------------------------------------------------------------------------------------------
# building entries


def run_entry(cfg: FedloraConfig, *, secure_aggregation: bool = False) -> dict[str, Any]:
    """The ``run`` entry the server appends at start (settings the report quotes)."""
    dp = cfg.dp
    return {
        "kind": "run", "mode": dp.mode, "accountant": dp.accountant, "noise_multiplier": dp.noise_multiplier,
        "target_epsilon": dp.target_epsilon, "delta": dp.delta, "max_grad_norm": dp.max_grad_norm,
        "max_epsilon": dp.max_epsilon, "physical_batch_size": dp.physical_batch_size,
        "ghost_clipping": dp.ghost_clipping, "strategy": cfg.strategy.name, "num_rounds": cfg.num_rounds,
        "num_clients": cfg.num_clients, "fraction_train": cfg.strategy.fraction_train,
        "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size, "adapter": cfg.adapter.kind,
        "quant": cfg.quant.format, "secure_aggregation": secure_aggregation,
    }  # fmt: skip


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def example_entry(result: Any, state: AccountantState, *, round_index: int, client: int | str) -> dict[str, Any]:
    """The ``example`` entry for one client's round, from :func:`~fedlora.privacy.dp_training.
    train_local_dp`'s result and returned state. The client builds it and sends it as JSON (a
    ConfigRecord string); the server appends it unchanged."""
    return {
        "kind": "example", "round": int(round_index), "client": str(client), "declined": bool(result.declined),
        "reason": result.reason, "num_examples": state.num_examples, "q": result.q, "sigma": result.sigma,
        "clip": result.clip, "batch_size": result.batch_size, "physical_batch_size": result.physical_batch_size,
        "local_steps": result.steps if not result.declined else 0, "dp_steps": result.dp_steps,
        "total_steps": state.total_steps, "delta": state.delta,
        "epsilon": _finite(result.epsilon), "epsilon_rdp": _finite(result.epsilon_rdp),
        "best_alpha": result.best_alpha, "epsilon_prv": _finite(result.epsilon_prv),
        "accountant": result.accountant, "sampling": "poisson", "noise_dtype": "float32",
        "history": [list(h) for h in state.history], "rounds": state.rounds, "calibration": state.calibration,
    }  # fmt: skip


def client_level_entry(state: AccountantState, *, round_index: int, clip: float, sampled: int, aggregated: int,
                       population: int, noise_std: float, epsilon: float | None) -> dict[str, Any]:  # fmt: skip
    """The ``client_level`` entry for one server release: ``sampled`` clients asked (q = sampled /
    population, what the accountant uses), ``aggregated`` updates averaged (m in the noise z·C/m)."""
    return {
        "kind": "client_level", "round": int(round_index), "noise_multiplier": state.sigma, "clip": clip,
        "clients": int(sampled), "aggregated": int(aggregated), "population": int(population),
        "q": sampled / population, "noise_std": noise_std, "delta": state.delta, "epsilon": _finite(epsilon),
        "history": [list(h) for h in state.history], "releases": state.total_steps,
    }  # fmt: skip


def restore_client_level_state(run_dir: str | Path) -> AccountantState | None:
    """The server's client-level accountant as the ledger last recorded it (resuming a run), or None."""
    try:
        entries = [e for e in read_ledger(run_dir) if e.get("kind") == "client_level"]
    except PrivacyError:
        return None
    if not entries:
        return None
    last = max(entries, key=lambda e: sum(h[2] for h in e["history"]))
    return AccountantState(history=[list(h) for h in last["history"]], delta=last["delta"],
                           sigma=last["noise_multiplier"], num_examples=last["population"])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# replay


@dataclass
class LedgerView:
    """A ledger replayed: the run's settings, each client's entries in order, the server's releases."""

    run: dict[str, Any] = field(default_factory=dict)
    clients: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    client_level: list[dict[str, Any]] = field(default_factory=list)

    def latest(self, client: str) -> dict[str, Any]:
        """The client's entry with the longest history (its latest; a re-run round only adds)."""
        return max(self.clients[client], key=lambda e: (sum(h[2] for h in e["history"]), len(e.get("rounds", []))))


def replay(entries: list[dict[str, Any]]) -> LedgerView:
    view = LedgerView()
    for e in entries:
        kind = e.get("kind")
        if kind == "run":
            view.run = e
        elif kind == "example":
            view.clients.setdefault(str(e["client"]), []).append(e)
        elif kind == "client_level":
            view.client_level.append(e)
        else:
            logger.warning("ledger entry of unknown kind %r skipped", kind)
    return view


def worst_epsilon(run_dir: str | Path) -> float | None:
    """The largest cumulative ε any client has reached so far (example-level), or the server's
    client-level ε; what ``metrics.jsonl`` carries as ``epsilon`` each round. None without entries."""
    try:
        view = replay(read_ledger(run_dir))
    except PrivacyError:
        return None
    latest = [view.latest(c) for c in view.clients] + view.client_level[-1:]
    values = [_recorded_epsilon(e) for e in latest]
    return max(values) if values else None


def _recorded_epsilon(entry: dict[str, Any]) -> float:
    """An entry's ε; a null one with steps in its history was infinite (σ = 0)."""
    if entry.get("epsilon") is not None:
        return float(entry["epsilon"])
    return math.inf if any(h[2] for h in entry.get("history", [])) else 0.0
