"""Differential privacy for federated LoRA (facts and traps: ../shared/docs/PRIVACY.md; usage and
the client/server contract: docs/privacy.md).

- :mod:`~fedlora.privacy.accounting` — the accountant state (composition history), ε from Opacus'
  RDP/PRV accountants, δ defaults, σ calibration over the planned steps, persistence.
- :mod:`~fedlora.privacy.grad_samplers` — exact per-example gradients of the adapter modules.
- :mod:`~fedlora.privacy.dp_training` — :func:`train_local_dp`, one private round on a client.
- :mod:`~fedlora.privacy.budget` — train or decline under ``dp.max_epsilon``.
- :mod:`~fedlora.privacy.client_level` — server-side DP-FedAvg: clip, noise, account.
- :mod:`~fedlora.privacy.ledger` — the run's append-only privacy ledger.
- :mod:`~fedlora.privacy.report` — ``privacy_report.{json,md}`` and ``epsilon.png``.
"""

from fedlora.privacy.accounting import (
    STATE_KEY,
    AccountantState,
    BudgetSpentError,
    PrivacyConfigError,
    PrivacyError,
    PrivacySpent,
    calibrate_noise,
    client_state_path,
    default_delta,
    load_state,
    most_spent,
    privacy_spent,
    save_state,
)
from fedlora.privacy.budget import BudgetDecision, check_round_budget
from fedlora.privacy.client_level import (
    ClientLevelDPError,
    check_client_level_strategy,
    check_secure_aggregation,
    privatize_round,
)
from fedlora.privacy.dp_training import DPTrainResult, train_local_dp
from fedlora.privacy.ledger import append_entry, example_entry, read_ledger, run_entry, worst_epsilon
from fedlora.privacy.report import privacy_report_main, write_privacy_report

__all__ = [
    "STATE_KEY",
    "AccountantState",
    "BudgetDecision",
    "BudgetSpentError",
    "ClientLevelDPError",
    "DPTrainResult",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivacySpent",
    "append_entry",
    "calibrate_noise",
    "check_client_level_strategy",
    "check_round_budget",
    "check_secure_aggregation",
    "client_state_path",
    "default_delta",
    "example_entry",
    "load_state",
    "most_spent",
    "privacy_report_main",
    "privacy_spent",
    "privatize_round",
    "read_ledger",
    "run_entry",
    "save_state",
    "train_local_dp",
    "worst_epsilon",
]
