"""Privacy accounting: the golden ε, cumulative ε across rounds and restarts (the per-round trap),
σ calibrated over the planned steps, δ defaults, and bad DP settings refused before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedlora.config import ConfigError, DPConfig, TrainConfig, config_from_dict
from fedlora.privacy.accounting import (
    AccountantState,
    BudgetSpentError,
    PrivacyConfigError,
    PrivacyError,
    calibrate_noise,
    client_state_path,
    compose,
    default_delta,
    epsilon_rdp,
    load_state,
    most_spent,
    persist_client_state,
    plan_example_level,
    privacy_spent,
    restore_client_state,
    save_state,
)
from fedlora.privacy.budget import check_round_budget, require_affordable_start

TRAP = {"sigma": 0.8, "q": 0.02, "steps": 50, "rounds": 20, "delta": 1e-5}


def test_golden_epsilon_rdp_and_prv():
    # Prepare: the golden value of docs/privacy.md
    history = [[1.1, 0.01, 10_000]]
    # Execute
    spent = privacy_spent(history, 1e-5)
    # Assert
    assert spent.epsilon == spent.epsilon_rdp == pytest.approx(5.63, abs=0.005)
    assert spent.best_alpha == pytest.approx(4.7)
    assert spent.epsilon_prv == pytest.approx(5.20, abs=0.01)
    assert spent.epsilon_prv <= spent.epsilon_rdp
    assert privacy_spent(history, 1e-5, "prv").epsilon == spent.epsilon_prv


def test_epsilon_is_cumulative_over_rounds_not_per_round():
    # Prepare: the trap example; the state goes through JSON every round, as through context.state
    state, per_round = AccountantState(), []
    # Execute
    for _ in range(TRAP["rounds"]):
        state = AccountantState.from_json(state.composed(TRAP["sigma"], TRAP["q"], TRAP["steps"]).to_json())
        fresh = AccountantState().composed(TRAP["sigma"], TRAP["q"], TRAP["steps"])  # the trap: new accountant
        per_round.append(epsilon_rdp(fresh.history, TRAP["delta"])[0])
    cumulative, _ = epsilon_rdp(state.history, TRAP["delta"])
    # Assert
    assert cumulative == pytest.approx(7.20, abs=0.005)
    assert max(per_round) == pytest.approx(2.85, abs=0.005)
    assert state.history == [[0.8, 0.02, 1000]] and state.total_steps == 1000


def test_epsilon_survives_a_restart_in_a_fresh_process(tmp_path):
    # Prepare: 10 rounds here, saved to disk as the client does
    state = AccountantState()
    for _ in range(10):
        state = state.composed(TRAP["sigma"], TRAP["q"], TRAP["steps"])
    path = save_state(state, client_state_path(tmp_path, 3, env={}))
    uninterrupted = state
    for _ in range(10):
        uninterrupted = uninterrupted.composed(TRAP["sigma"], TRAP["q"], TRAP["steps"])
    code = (
        "import sys, json\n"
        "from fedlora.privacy.accounting import load_state, save_state, epsilon_rdp\n"
        "s = load_state(sys.argv[1])\n"
        "for _ in range(10): s = s.composed(0.8, 0.02, 50)\n"
        "save_state(s, sys.argv[1])\n"
        "print(json.dumps(epsilon_rdp(s.history, 1e-5)))\n"
    )
    # Execute: a new interpreter loads the file and runs the other 10 rounds
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    resumed_eps, _ = json.loads(out.stdout)
    # Assert: same ε, to the last bit, as never stopping
    assert path == tmp_path / "clients" / "3" / "privacy.json"
    assert resumed_eps == epsilon_rdp(uninterrupted.history, 1e-5)[0] == pytest.approx(7.20, abs=0.005)
    assert load_state(path).total_steps == 1000


def test_state_files_and_the_env_override(tmp_path):
    # Prepare
    small, big = AccountantState().composed(1.0, 0.1, 5), AccountantState().composed(1.0, 0.1, 9)
    # Execute
    path = client_state_path("ignored", 0, env={"FEDLORA_PRIVACY_DIR": str(tmp_path)})
    # Assert
    assert path == tmp_path / "client-0.json"
    assert load_state(path) is None
    assert most_spent(small, None, big) is big and most_spent(None).history == []
    with pytest.MonkeyPatch.context() as mp:  # the client's two helpers: disk copy + context.state copy
        mp.delenv("FEDLORA_PRIVACY_DIR", raising=False)
        context_json = persist_client_state(small, tmp_path, 7)
        assert restore_client_state(context_json, tmp_path, 7).history == small.history
        save_state(big, client_state_path(tmp_path, 7))  # e.g. a newer file than the context copy
        assert restore_client_state(context_json, tmp_path, 7).history == big.history
        assert restore_client_state(None, tmp_path, 8).history == []
    with pytest.raises(PrivacyError, match="version"):
        AccountantState.from_dict({"version": 99})
    with pytest.raises(PrivacyError, match="out of range"):
        AccountantState.from_dict({"history": [[1.0, 1.5, 3]]})


def test_sigma_is_calibrated_over_planned_rounds_times_local_steps():
    # Prepare: target ε = 3 over 20 rounds × 50 steps at q = 0.02
    planned = TRAP["rounds"] * TRAP["steps"]
    # Execute
    sigma = calibrate_noise(3.0, 1e-5, 0.02, planned)
    sigma_one_round = calibrate_noise(3.0, 1e-5, 0.02, TRAP["steps"])
    # Assert: the run ends at the target; a per-round calibration overshoots it badly
    assert 2.98 <= epsilon_rdp([[sigma, 0.02, planned]], 1e-5)[0] <= 3.0
    assert epsilon_rdp([[sigma_one_round, 0.02, planned]], 1e-5)[0] > 6.0


def test_plan_fixes_q_delta_and_sigma_and_reuses_the_calibration():
    # Prepare
    dp = DPConfig(mode="example", target_epsilon=3.0)
    train = TrainConfig(local_steps=50, batch_size=20)
    # Execute
    plan = plan_example_level(dp, train, num_examples=1000, num_rounds=20, state=AccountantState())
    state = AccountantState(history=[[plan.sigma, plan.q, 50]], sigma=plan.sigma, delta=plan.delta,
                            calibration=plan.calibration)
    again = plan_example_level(dp, train, num_examples=1000, num_rounds=20, state=state)
    # Assert
    assert plan.q == 0.02 and plan.delta == 1e-5 and plan.planned_steps == 1000 and plan.physical_batch_size == 20
    assert plan.sigma == calibrate_noise(3.0, 1e-5, 0.02, 1000) and again.sigma == plan.sigma
    with pytest.raises(PrivacyConfigError, match="changed mid-run"):
        plan_example_level(dp, train, num_examples=1000, num_rounds=30, state=state)


def test_default_delta_is_min_1e5_and_a_tenth_of_one_over_n():
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)


@pytest.mark.parametrize(
    "dp, message",
    [
        ({"mode": "example", "noise_multiplier": 1.0, "target_epsilon": 3.0}, "not both"),
        ({"mode": "example", "noise_multiplier": 1.0, "delta": 1.5}, "delta"),
        ({"mode": "example", "noise_multiplier": 1.0, "delta": 0.0}, "delta"),
        ({"mode": "example", "target_epsilon": -1.0}, "target_epsilon"),
        ({"mode": "example"}, "needs dp.noise_multiplier or dp.target_epsilon"),
        ({"mode": "example", "noise_multiplier": 1.0, "max_epsilon": 0.0}, "max_epsilon"),
    ],
)
def test_out_of_range_dp_config_is_refused_by_the_schema(dp, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"dp": dp})


@pytest.mark.parametrize(
    "dp, train, n, message",
    [
        (DPConfig(mode="example", noise_multiplier=1.0), TrainConfig(batch_size=8), 5, "dataset too small"),
        (DPConfig(mode="example", noise_multiplier=1.0, delta=0.01), TrainConfig(), 100, "not below 1/N_k"),
        (DPConfig(mode="example", target_epsilon=1e-6), TrainConfig(), 100, "cannot be reached"),
        (DPConfig(mode="example", target_epsilon=8.0, max_epsilon=4.0), TrainConfig(), 100, "exceeds the budget"),
        (DPConfig(mode="example", noise_multiplier=1.0), TrainConfig(grad_accum=2), 100, "grad_accum"),
        (DPConfig(mode="client", noise_multiplier=1.0), TrainConfig(), 100, "dp.mode=example"),
    ],
)
def test_bad_dp_settings_for_this_client_fail_before_training(dp, train, n, message):
    with pytest.raises(PrivacyConfigError, match=message):
        plan_example_level(dp, train, num_examples=n, num_rounds=3, state=AccountantState())


def test_budget_declines_the_round_that_would_exceed_it_and_refuses_an_unaffordable_start():
    # Prepare: rounds of 50 steps at the trap's σ, q reach ε = 2.85, 3.28, 3.62; the budget is 3.5
    one_round = compose([], 0.8, 0.02, 50)
    # Execute
    first = check_round_budget([], sigma=0.8, q=0.02, steps=50, delta=1e-5, max_epsilon=3.5)
    third = check_round_budget(compose(one_round, 0.8, 0.02, 50), sigma=0.8, q=0.02, steps=50, delta=1e-5, max_epsilon=3.5)
    tiny = check_round_budget([], sigma=0.8, q=0.02, steps=50, delta=1e-5, max_epsilon=1.0)
    # Assert
    assert first.train and first.epsilon_after == pytest.approx(2.85, abs=0.005)
    assert not third.train and third.epsilon_now < 3.5 < third.epsilon_after and "declines" in third.reason
    assert third.epsilon_after == pytest.approx(3.62, abs=0.005)
    require_affordable_start(third, one_round)  # has history: a decline, not an error
    with pytest.raises(BudgetSpentError, match="already spent at the start"):
        require_affordable_start(tiny, [])
