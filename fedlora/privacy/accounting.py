"""Privacy accounting: a client's composition history as a plain value, ε from Opacus' accountants,
and σ calibrated over the whole federation.

The accountant's only state is its *composition history*, Opacus' list of ``(σ, q, steps)``
entries (noise multiplier, sampling rate, number of sampled-Gaussian steps). ε is always a pure
function of that list and δ::

    ε_RDP(history, δ) = min_α [ Σ_entries steps·RDP_α(q, σ) + log(1/δ)/(α−1) − … ]   (headline)
    ε_PRV(history, δ) ≤ ε_RDP                     (tighter, reported beside it when it computes)

so :class:`AccountantState` stores the history and never an ε, and anyone can recompute every
number with ``opacus.accountants.RDPAccountant`` / ``PRVAccountant`` alone.

The trap this module exists to avoid (docs/privacy.md): a new accountant each round reports one round's
ε. Here the state is an explicit value, passed in and returned — the client keeps it in Flower's
``context.state`` and on disk (:func:`save_state` / :func:`load_state`) — so ε composes over every
round a client took part in, across process restarts. With q = 0.02, σ = 0.8, 50 steps × 20
rounds, δ = 1e-5 the cumulative RDP ε is 7.20; a per-round accountant would say 2.85.

σ for a target ε is calibrated once, over the *planned* steps (rounds × local steps), with
``opacus.accountants.utils.get_noise_multiplier`` — not per round, and not for one run's epochs as
``make_private_with_epsilon`` would.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, DPConfig, TrainConfig
from fedlora.rundir.files import CLIENT_PRIVACY_FILE, CLIENTS_DIR

STATE_VERSION = 1
STATE_KEY = "fedlora.privacy"
"""Key of the client's ConfigRecord in Flower's ``context.state`` (value: ``{"state": json}``)."""
STATE_DIR_ENV = "FEDLORA_PRIVACY_DIR"
"""When set, client accountant files live under this folder instead of ``<run_dir>/clients/``."""


class PrivacyError(ValueError):
    """A privacy computation or record cannot be done as asked."""


class PrivacyConfigError(ConfigError):
    """The DP settings cannot give a meaningful guarantee for this client or run (raised before
    any training, so the CLI reports it as one clear configuration error)."""


class BudgetSpentError(PrivacyConfigError):
    """The ε budget cannot pay for a single round: nothing would ever train."""


# ---------------------------------------------------------------------------------------------
# the state


@dataclass
class AccountantState:
    """One client's (or the server's client-level) privacy accountant as a JSON-ready value."""

    history: list[list[float]] = field(default_factory=list)
    """Opacus' composition history: ``[σ, q, steps]`` entries, consecutive equal (σ, q) merged."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """One entry per round this client was asked to train: ``round``, ``steps`` (0 if declined),
    ``sigma``, ``q``, ``declined``, ``reason``, ``phase`` (``train`` or ``fedsb_init``)."""
    delta: float | None = None
    """δ fixed at the first round; later rounds must use the same (ε is reported at one δ)."""
    sigma: float | None = None
    """σ of the last round (given, or calibrated: then reused while ``calibration`` matches)."""
    calibration: dict[str, Any] | None = None
    """What σ was calibrated for: target_epsilon, delta, q, planned_steps, accountant."""
    num_examples: int | None = None
    """N_k (example-level) or the client population (client-level)."""
    version: int = STATE_VERSION

    @property
    def total_steps(self) -> int:
        return int(sum(entry[2] for entry in self.history))

    @property
    def rounds_participated(self) -> int:
        return sum(1 for r in self.rounds if not r.get("declined"))

    def composed(self, sigma: float, q: float, steps: int) -> AccountantState:
        """A new state with ``steps`` more sampled-Gaussian steps at (σ, q) in its history."""
        return replace(self, history=compose(self.history, sigma, q, steps), rounds=list(self.rounds))

    def with_round(self, entry: dict[str, Any]) -> AccountantState:
        return replace(self, history=[list(h) for h in self.history], rounds=[*self.rounds, dict(entry)])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Exact: floats are written with ``repr``, so a reloaded state gives the same ε."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccountantState:
        if not isinstance(data, dict):
            raise PrivacyError(f"accountant state must be a mapping, got {type(data).__name__}")
        version = data.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise PrivacyError(f"accountant state version {version} is not {STATE_VERSION}; it was written by another fedlora")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise PrivacyError(f"accountant state has unknown keys {sorted(unknown)}")
        history = [[float(s), float(q), int(n)] for s, q, n in data.get("history", [])]
        for s, q, n in history:
            if s < 0 or not 0 < q <= 1 or n < 0:
                raise PrivacyError(f"accountant history entry (σ={s}, q={q}, steps={n}) is out of range")
        return cls(**{**data, "history": history, "rounds": [dict(r) for r in data.get("rounds", [])]})

    @classmethod
    def from_json(cls, text: str) -> AccountantState:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise PrivacyError(f"accountant state is not valid JSON: {err}") from None

    @classmethod
    def coerce(cls, value: AccountantState | dict[str, Any] | str | None) -> AccountantState:
        """Accept a state, its dict, its JSON, or None (a fresh accountant: the first round)."""
        if value is None or value == "":
            return cls()
        if isinstance(value, AccountantState):
            return cls.from_dict(value.to_dict())  # a copy: the caller's value is never mutated
        if isinstance(value, str):
            return cls.from_json(value)
        return cls.from_dict(value)


def compose(history: list[list[float]], sigma: float, q: float, steps: int) -> list[list[float]]:
    """``history`` plus ``steps`` steps at (σ, q); merges with the last entry when equal, as
    Opacus' ``RDPAccountant.step`` does (the PRV accountant's cost grows with the entries)."""
    out = [list(h) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1][2] = int(out[-1][2]) + int(steps)
    else:
        out.append([float(sigma), float(q), int(steps)])
    return out


# ---------------------------------------------------------------------------------------------
# ε from a history (Opacus' accountants only)


@dataclass(frozen=True)
class PrivacySpent:
    """ε of a history at δ: RDP (with its best order α) and PRV (None when it does not compute)."""

    epsilon: float
    """The headline: RDP, or PRV when ``accountant == "prv"`` and it computed."""
    accountant: str
    epsilon_rdp: float
    best_alpha: float | None
    epsilon_prv: float | None
    delta: float


def epsilon_rdp(history: list[list[float]], delta: float) -> tuple[float, float | None]:
    """(ε, best α) from ``opacus.accountants.RDPAccountant``; (0, None) for an empty history and
    (inf, None) when any step had σ = 0 (no noise: no guarantee)."""
    from opacus.accountants import RDPAccountant

    if not history or all(n == 0 for _, _, n in history):
        return 0.0, None
    if any(s == 0 for s, _, n in history if n):
        return math.inf, None
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history if n]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound stays valid
        warnings.simplefilter("ignore", UserWarning)
        eps, alpha = acc.get_privacy_spent(delta=delta)
    return float(eps), float(alpha)


def epsilon_prv(history: list[list[float]], delta: float) -> float | None:
    """ε upper bound from ``opacus.accountants.PRVAccountant``, or None when it cannot compute
    (σ = 0, extreme parameters: its numerical domain fails) — RDP is then the only figure."""
    from opacus.accountants import PRVAccountant

    if not history or all(n == 0 for _, _, n in history):
        return 0.0
    if any(s == 0 for s, _, n in history if n):
        return None
    acc = PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history if n]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps = float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, FloatingPointError, OverflowError, MemoryError):
        return None
    return eps if math.isfinite(eps) else None


def privacy_spent(history: list[list[float]], delta: float, accountant: str = "rdp", *, with_prv: bool = True) -> PrivacySpent:
    """Every figure the report shows for one history. ``with_prv=False`` skips PRV (slower) unless
    it is the headline."""
    if accountant not in ("rdp", "prv"):
        raise PrivacyError(f"accountant={accountant!r} must be rdp or prv")
    rdp, alpha = epsilon_rdp(history, delta)
    prv = epsilon_prv(history, delta) if (with_prv or accountant == "prv") else None
    if accountant == "prv" and prv is not None:
        return PrivacySpent(prv, "prv", rdp, alpha, prv, delta)
    return PrivacySpent(rdp, "rdp", rdp, alpha, prv, delta)


def headline_epsilon(history: list[list[float]], delta: float, accountant: str = "rdp") -> float:
    """The ε budgets are checked against: RDP, or PRV (falling back to RDP when PRV fails)."""
    return privacy_spent(history, delta, accountant, with_prv=False).epsilon


# ---------------------------------------------------------------------------------------------
# δ and σ


def default_delta(num_examples: int) -> float:
    """min(1e-5, 1/(10·N)): well below 1/N, so 'leak one record outright' is not allowed.
    Never derived from the number of batches (docs/privacy.md)."""
    if num_examples < 1:
        raise PrivacyConfigError("cannot choose δ for an empty dataset")
    return min(1e-5, 1.0 / (10 * num_examples))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """σ so that ``steps`` steps at sampling rate q end at ``target_epsilon`` (at δ), with
    ``opacus.accountants.utils.get_noise_multiplier`` (binary search to 0.01 in ε)."""
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise PrivacyConfigError(f"cannot calibrate σ over {steps} planned steps")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=int(steps), accountant=accountant,
            ))  # fmt: skip
    except ValueError as err:
        raise PrivacyConfigError(
            f"dp.target_epsilon={target_epsilon} cannot be reached at δ={delta:.3g} over {steps} steps at "
            f"q={sample_rate:.4g} ({err}); raise dp.target_epsilon or lower the planned rounds × local steps"
        ) from None


@dataclass(frozen=True)
class ExamplePlan:
    """What one client's DP-SGD round will do, validated before any training."""

    num_examples: int
    q: float
    """Poisson sampling rate: expected logical batch / N_k."""
    delta: float
    sigma: float
    clip: float
    batch_size: int
    """Expected logical batch (``train.batch_size``); the noisy sum is divided by it."""
    physical_batch_size: int
    local_steps: int
    planned_steps: int
    accountant: str
    calibration: dict[str, Any] | None


def plan_example_level(
    dp: DPConfig,
    train: TrainConfig,
    *,
    num_examples: int,
    num_rounds: int,
    state: AccountantState,
    extra_planned_steps: int | None = None,
) -> ExamplePlan:
    """Validate the DP settings against this client's data and history; fix q, δ and σ.

    σ: ``dp.noise_multiplier``, or calibrated for ``dp.target_epsilon`` over
    ``num_rounds × train.local_steps + extra_planned_steps`` steps (a client that takes part in
    every round ends at the target; one sampled less often ends below it). A calibrated σ is kept in
    ``state`` and reused while the calibration inputs are unchanged. ``extra_planned_steps``
    (default: the steps of the non-training phases already in ``state``, i.e. a private Fed-SB
    init) counts steps outside the rounds' local training.

    Raises :class:`PrivacyConfigError` for a dataset too small for the logical batch (q > 1), a δ
    of 1/N_k or more, gradient accumulation under Poisson sampling, a δ changed mid-run, a target
    ε that cannot be reached, and a target above the budget ``dp.max_epsilon``.
    """
    if dp.mode != "example":
        raise PrivacyConfigError(f"example-level DP-SGD needs dp.mode=example, got dp.mode={dp.mode}")
    n = int(num_examples)
    if n < 1:
        raise PrivacyConfigError("this client has no training examples; DP-SGD needs at least one")
    b = train.batch_size
    if b > n:
        raise PrivacyConfigError(
            f"dataset too small for the sampling rate: this client has N_k={n} examples but "
            f"train.batch_size={b} asks for an expected logical batch of {b} (q = {b}/{n} > 1); "
            f"lower train.batch_size to at most {n} or give the client more data"
        )
    if train.grad_accum != 1:
        raise PrivacyConfigError(
            f"train.grad_accum={train.grad_accum}: under DP the logical batch is train.batch_size "
            "(Poisson-sampled; accumulating several sampled batches would break the accountant's "
            "assumption); set train.grad_accum=1 and dp.physical_batch_size for memory instead"
        )
    physical = dp.physical_batch_size if dp.physical_batch_size is not None else b
    if physical < 1:
        raise PrivacyConfigError(f"dp.physical_batch_size={physical} must be at least 1")
    q = b / n
    if dp.delta is not None:
        if dp.delta >= 1.0 / n:
            raise PrivacyConfigError(
                f"dp.delta={dp.delta:g} is not below 1/N_k = 1/{n}: such a δ allows publishing one "
                f"example outright; use δ ≤ {default_delta(n):.3g} (the default) or leave dp.delta unset"
            )
        delta = float(dp.delta)
    else:
        delta = state.delta if state.delta is not None else default_delta(n)
    if state.delta is not None and state.delta != delta:
        raise PrivacyConfigError(
            f"this client's accountant was started at δ={state.delta:g} but dp.delta={delta:g} now; "
            "δ is fixed for a run (ε is reported at one δ): restore dp.delta or start a new run"
        )
    if extra_planned_steps is None:
        extra_planned_steps = sum(int(r["steps"]) for r in state.rounds if r.get("phase", "train") != "train")
    planned = num_rounds * train.local_steps + extra_planned_steps
    calibration = None
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
    else:
        if dp.target_epsilon is None:
            raise PrivacyConfigError("dp.mode=example needs dp.noise_multiplier or dp.target_epsilon")
        if dp.max_epsilon is not None and dp.target_epsilon > dp.max_epsilon:
            raise PrivacyConfigError(
                f"dp.target_epsilon={dp.target_epsilon} exceeds the budget dp.max_epsilon={dp.max_epsilon}: "
                "clients would stop before the planned rounds end; lower the target or raise the budget"
            )
        calibration = {"target_epsilon": float(dp.target_epsilon), "delta": delta, "q": q,
                       "planned_steps": int(planned), "accountant": dp.accountant}  # fmt: skip
        if state.calibration == calibration and state.sigma is not None:
            sigma = float(state.sigma)
        elif state.history and state.calibration is not None:
            raise PrivacyConfigError(
                f"σ was calibrated for {state.calibration} but this round asks for {calibration}; "
                "the planned rounds, local steps, batch size or target changed mid-run: restore them "
                "or start a new run"
            )
        else:
            sigma = calibrate_noise(dp.target_epsilon, delta, q, planned, dp.accountant)
    return ExamplePlan(
        num_examples=n, q=q, delta=delta, sigma=sigma, clip=float(dp.max_grad_norm), batch_size=b,
        physical_batch_size=physical, local_steps=train.local_steps, planned_steps=int(planned),
        accountant=dp.accountant, calibration=calibration,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# persistence across restarts


def client_state_path(run_dir: str | Path, partition_id: int | str, env: dict[str, str] | None = None) -> Path:
    """Where a client keeps its accountant on disk: ``$FEDLORA_PRIVACY_DIR/client-<id>.json`` when
    that variable is set (deployed SuperNodes: a folder on the client's own machine), else
    ``<run_dir>/clients/<id>/privacy.json`` (simulation)."""
    env = os.environ if env is None else env
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV]) / f"client-{partition_id}.json"
    return Path(run_dir) / CLIENTS_DIR / str(partition_id) / CLIENT_PRIVACY_FILE


def save_state(state: AccountantState, path: str | Path) -> Path:
    """Write atomically (temp file, fsync, rename): a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_state(path: str | Path) -> AccountantState | None:
    """The state saved at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    return AccountantState.from_json(path.read_text())


def most_spent(*states: AccountantState | None) -> AccountantState:
    """Of several copies of one client's state (``context.state``, disk), the one that has seen
    the most: most steps, then most rounds. Never the smaller one — that would forget privacy loss."""
    present = [s for s in states if s is not None]
    if not present:
        return AccountantState()
    return max(present, key=lambda s: (s.total_steps, len(s.rounds)))


def restore_client_state(context_json: str | None, run_dir: str | Path, partition_id: int | str) -> AccountantState:
    """A client's accountant at the start of a round: the copy in Flower's ``context.state`` (same
    process) or the file (after a restart, :func:`client_state_path`), whichever has seen more."""
    in_context = AccountantState.from_json(context_json) if context_json else None
    return most_spent(in_context, load_state(client_state_path(run_dir, partition_id)))


def persist_client_state(state: AccountantState, run_dir: str | Path, partition_id: int | str) -> str:
    """Save the state to disk (atomically) and return its JSON for ``context.state``. Call it
    *before* replying: an update released without its privacy cost on record would be forgotten
    by a restart."""
    save_state(state, client_state_path(run_dir, partition_id))
    return state.to_json()
