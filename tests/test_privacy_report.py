"""The privacy ledger and report: two clients train under DP-SGD (one runs out of budget), the
ledger records it, and the report's ε is recomputed from the recorded histories with Opacus alone."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.adapters import LoRALinear, inject_adapters
from fedlora.config import AdapterConfig, DPConfig, FedloraConfig, TrainConfig
from fedlora.data.records import tokenize_example
from fedlora.privacy.accounting import PrivacyError, client_state_path, load_state, save_state
from fedlora.privacy.client_level import account_round
from fedlora.privacy.dp_training import train_local_dp
from fedlora.privacy.ledger import (
    append_entry,
    client_level_entry,
    example_entry,
    ledger_path,
    read_ledger,
    restore_client_level_state,
    run_entry,
    worst_epsilon,
)
from fedlora.privacy.report import build_privacy_report, privacy_report_main, write_privacy_report
from fedlora.model.tiny import build_tiny_model


def _opacus(history, delta):
    rdp = RDPAccountant()
    rdp.history = [tuple(h) for h in history]
    prv = PRVAccountant()
    prv.history = [tuple(h) for h in history]
    return rdp.get_privacy_spent(delta=delta), prv.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """Two clients, two rounds, σ = 1, 2 steps a round: client 0 (N=6, q=0.5) reaches ε = 5.38 after
    round 1 and declines round 2 (would be 7.41 > 6.5); client 1 (N=12, q=0.25) trains both (ε = 4.87)."""
    from fedlora.model.tiny import build_tiny_tokenizer

    run_dir = tmp_path_factory.mktemp("run")
    tokenizer = build_tiny_tokenizer()
    data = {cid: [tokenize_example(f"Q{cid}: {i}+1?\nA: ", f"{i + 1}", tokenizer, 32) for i in range(n)]
            for cid, n in ((0, 6), (1, 12))}  # fmt: skip
    cfg = FedloraConfig(dp=DPConfig(mode="example", noise_multiplier=1.0, max_epsilon=6.5),
                        train=TrainConfig(local_steps=2, batch_size=3), num_rounds=2)  # fmt: skip
    append_entry(run_dir, run_entry(cfg))
    model = build_tiny_model(len(tokenizer), seed=0)
    inject_adapters(model, AdapterConfig(rank=2), LoRALinear)
    for rnd in (1, 2):
        for cid, examples in data.items():
            # client side: state from disk (the restart-safe copy), train, save, reply with the entry as JSON
            path = client_state_path(run_dir, cid, env={})
            result, state = train_local_dp(model, examples, cfg.train, cfg.dp, pad_id=0, round_index=rnd,
                                           num_rounds=2, seed=rnd, accountant_state=load_state(path), dp_seed=rnd)  # fmt: skip
            save_state(state, path)
            wire = json.dumps(example_entry(result, state, round_index=rnd, client=cid))
            # server side
            append_entry(run_dir, json.loads(wire))
    return run_dir


def test_report_is_recomputed_from_the_recorded_history_with_opacus_alone(dp_run):
    # Execute
    paths = write_privacy_report(dp_run)
    report = json.loads(paths["json"].read_text())
    # Assert: files
    assert sorted(p.name for p in paths.values()) == ["epsilon.png", "privacy_report.json", "privacy_report.md"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ... every client's ε equals Opacus' on the history the report itself lists
    c0, c1 = report["clients"]
    for c in (c0, c1):
        (rdp, alpha), prv = _opacus(c["history"], c["delta"])
        assert c["epsilon"] == c["epsilon_rdp"] == rdp and c["best_alpha"] == alpha
        assert c["epsilon_prv"] == prv and prv <= rdp
    assert c0["history"] == [[1.0, 0.5, 2]] and c1["history"] == [[1.0, 0.25, 4]]
    assert c0["epsilon"] == pytest.approx(5.377, abs=1e-3) and c1["epsilon"] == pytest.approx(4.871, abs=1e-3)
    # ... per-client parameters, participation, the refusal and the worst client
    assert (c0["num_examples"], c0["q"], c0["sigma"], c0["clip"], c0["batch_size"], c0["physical_batch_size"],
            c0["local_steps"], c0["delta"]) == (6, 0.5, 1.0, 1.0, 3, 3, 2, 1e-5)  # fmt: skip
    assert (c0["rounds_participated"], c1["rounds_participated"], c0["total_steps"], c1["total_steps"]) == (1, 2, 2, 4)
    assert [d["round"] for d in c0["declined"]] == [2] and "dp.max_epsilon=6.5" in c0["declined"][0]["reason"]
    assert report["worst_client"]["client"] == "0" and report["worst_client"]["epsilon"] == c0["epsilon"]
    assert worst_epsilon(dp_run) == c0["epsilon"]
    assert [p["epsilon"] for p in c1["epsilon_by_round"]] == pytest.approx([3.870, 4.871], abs=1e-3)
    # ... and the run-wide items of the report (docs/privacy.md)
    assert report["consistent"] and report["sampling"]["poisson"] and report["noise_dtype"] == "float32"
    assert report["privacy_unit"] == "one training example" and "secure aggregation is off" in report["threat_model"]
    assert {"opacus", "torch", "flwr", "fedlora"} <= set(report["versions"]) and report["client_level"] is None
    assert f"ε = {c0['epsilon']:.3g}" in report["statement"]
    markdown = paths["markdown"].read_text()
    assert "## Declined rounds" in markdown and "[[1.0, 0.25, 4]]" in markdown and report["statement"] in markdown


def test_a_tampered_recorded_epsilon_does_not_change_the_report(dp_run, tmp_path):
    # Prepare: a copy of the ledger whose clients claim ε = 0.1
    lines = [json.loads(line) for line in ledger_path(dp_run).read_text().splitlines()]
    for e in lines:
        if e["kind"] == "example":
            e["epsilon"] = 0.1
    ledger_path(tmp_path).write_text("".join(json.dumps(e) + "\n" for e in lines))
    # Execute
    honest, tampered = build_privacy_report(dp_run), build_privacy_report(tmp_path)
    # Assert
    assert [c["epsilon"] for c in tampered["clients"]] == [c["epsilon"] for c in honest["clients"]]
    assert not tampered["consistent"] and honest["consistent"]


def test_client_state_files_hold_the_cumulative_history(dp_run):
    assert load_state(client_state_path(dp_run, 1, env={})).history == [[1.0, 0.25, 4]]
    assert [r["declined"] for r in load_state(client_state_path(dp_run, 0, env={})).rounds] == [False, True]


def test_ledger_is_append_only_and_survives_a_torn_line(tmp_path, caplog):
    # Prepare
    append_entry(tmp_path, {"kind": "run", "mode": "example"})
    with open(ledger_path(tmp_path), "a") as f:
        f.write('{"kind": "example", "cli')  # a crash mid-write
    before = ledger_path(tmp_path).read_text()
    # Execute
    append_entry(tmp_path, {"kind": "run", "mode": "client"})
    entries = read_ledger(tmp_path)
    # Assert
    assert ledger_path(tmp_path).read_text().startswith(before)
    assert [e["mode"] for e in entries] == ["example", "client"] and "torn" in caplog.text
    with pytest.raises(PrivacyError, match="kind"):
        append_entry(tmp_path, {"kind": "bogus"})


def test_client_level_section_and_cli(tmp_path, capsys):
    # Prepare: three server releases, z = 1.1, m = 2 of P = 4
    append_entry(tmp_path, run_entry(FedloraConfig(dp=DPConfig(mode="client", noise_multiplier=1.1), num_clients=4)))
    state = None
    for rnd in (1, 2, 3):
        state = account_round(state, noise_multiplier=1.1, clients=2, population=4, delta=1e-5, round_index=rnd)
        append_entry(tmp_path, client_level_entry(state, round_index=rnd, clip=0.1, sampled=2, aggregated=2,
                                                  population=4, noise_std=1.1 * 0.1 / 2, epsilon=None))  # fmt: skip
    # Execute
    privacy_report_main(str(tmp_path))
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    # Assert
    cl = report["client_level"]
    (rdp, alpha), prv = _opacus([[1.1, 0.5, 3]], 1e-5)
    assert report["mode"] == "client" and report["privacy_unit"] == "one client (all of its data)"
    assert (cl["epsilon"], cl["best_alpha"], cl["epsilon_prv"], cl["releases"], cl["population"]) == (rdp, alpha, prv, 3, 4)
    assert f"client-level ε = {rdp:.3f}" in capsys.readouterr().out
    assert restore_client_level_state(tmp_path).history == [[1.1, 0.5, 3]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrivacyError, match="no privacy ledger"):
        privacy_report_main(str(empty))
    with pytest.raises(PrivacyError, match="not a directory"):
        privacy_report_main(str(tmp_path / "missing"))
