"""Differential privacy for federated LoRA (privacy model, traps, usage and the client/server
contract: docs/privacy.md).

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
    persist_client_state,
    privacy_spent,
    restore_client_state,
    save_state,
)
from fedlora.privacy.budget import BudgetDecision, check_round_budget
from fedlora.privacy.client_level import (
    ClientLevelDPError,
    account_round,
    check_client_level_strategy,
    check_secure_aggregation,
    client_level_noise,
    client_level_spent,
    noise_generator,
    privatize_round,
)
from fedlora.privacy.dp_fedavg import ClientLevelDP
from fedlora.privacy.dp_training import DPTrainResult, private_dense_gradient, train_local_dp
from fedlora.privacy.ledger import (
    append_entry,
    client_level_entry,
    example_entry,
    read_ledger,
    restore_client_level_state,
    run_entry,
    worst_epsilon,
)
from fedlora.privacy.report import privacy_report_main, write_privacy_report

__all__ = [
    "ClientLevelDP",
    "STATE_KEY",
    "AccountantState",
    "BudgetDecision",
    "BudgetSpentError",
    "ClientLevelDPError",
    "DPTrainResult",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivacySpent",
    "account_round",
    "append_entry",
    "calibrate_noise",
    "check_client_level_strategy",
    "check_round_budget",
    "check_secure_aggregation",
    "client_level_entry",
    "client_level_noise",
    "client_level_spent",
    "client_state_path",
    "default_delta",
    "example_entry",
    "load_state",
    "most_spent",
    "noise_generator",
    "persist_client_state",
    "privacy_report_main",
    "privacy_spent",
    "private_dense_gradient",
    "privatize_round",
    "read_ledger",
    "restore_client_level_state",
    "restore_client_state",
    "run_entry",
    "save_state",
    "train_local_dp",
    "worst_epsilon",
    "write_privacy_report",
]
