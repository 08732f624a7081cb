"""The privacy report of a run: ``privacy_report.json``, ``privacy_report.md`` and ``epsilon.png``.

Every ε in the report is recomputed here from the composition histories recorded in the ledger
(:mod:`fedlora.privacy.ledger`), with ``opacus.accountants.RDPAccountant`` (headline, with its best
order α) and ``PRVAccountant`` (beside it, when it computes) — never copied from what clients
reported. Each client's figure is also compared with the one it reported (``consistent``).
Anyone can redo it from the JSON alone::

    from opacus.accountants import RDPAccountant
    acc = RDPAccountant(); acc.history = [tuple(h) for h in client["history"]]
    acc.get_privacy_spent(delta=client["delta"])        # == (client["epsilon_rdp"], client["best_alpha"])

Contents (docs/privacy.md, "Report"): privacy unit and adjacency, threat model, per-client
parameters and composition history, ε (RDP with α, PRV), δ, worst client, the client-level section,
sampling, dtype, versions, declined rounds and a plain-language statement.
"""

from __future__ import annotations

import json
import math
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fedlora.privacy.accounting import PrivacyError, epsilon_prv, epsilon_rdp, headline_epsilon
from fedlora.privacy.ledger import LedgerView, ledger_path, read_ledger, replay
from fedlora.rundir.files import PRIVACY_PLOT_FILE, PRIVACY_REPORT_JSON, PRIVACY_REPORT_MD

ADJACENCY = {
    "example": "add/remove one training example of one client (Poisson sampling, as Opacus' accountants assume)",
    "client": "add/remove one client's whole dataset (its update), clients sampled with rate q = m/population",
}
UNIT = {"example": "one training example", "client": "one client (all of its data)"}


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("fedlora", "opacus", "torch", "flwr", "numpy", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _num(x: float | None) -> float | str | None:
    """JSON-safe: ∞ becomes the string "inf" (σ = 0 gives no guarantee)."""
    if x is None:
        return None
    return "inf" if math.isinf(x) else float(x)


def _eps(history: list[list[float]], delta: float, accountant: str) -> dict[str, Any]:
    rdp, alpha = epsilon_rdp(history, delta)
    prv = epsilon_prv(history, delta)
    headline, used = (prv, "prv") if accountant == "prv" and prv is not None else (rdp, "rdp")
    return {"epsilon": headline, "accountant": used, "epsilon_rdp": rdp, "best_alpha": alpha, "epsilon_prv": prv}


def _client_section(view: LedgerView, client: str, accountant: str) -> dict[str, Any]:
    entries = view.clients[client]
    last = view.latest(client)
    delta = float(last["delta"])
    eps = _eps(last["history"], delta, accountant)
    rounds = last.get("rounds", [])
    trained = [r for r in rounds if not r.get("declined")]
    by_round = []
    for e in entries:  # in ledger order; ε recomputed from each entry's own history
        by_round.append({"round": e["round"], "epsilon": _num(headline_epsilon(e["history"], delta, accountant)),
                         "declined": bool(e.get("declined"))})  # fmt: skip
    recorded = last.get("epsilon")
    recomputed = eps["epsilon"]
    consistent = (recorded is None and math.isinf(recomputed)) or (
        recorded is not None and math.isclose(recorded, recomputed, rel_tol=1e-9, abs_tol=1e-12)
    )
    return {
        "client": client,
        "num_examples": last.get("num_examples"),
        "q": last.get("q"), "sigma": last.get("sigma"), "clip": last.get("clip"),
        "batch_size": last.get("batch_size"), "physical_batch_size": last.get("physical_batch_size"),
        "local_steps": max((r.get("local_steps", 0) for r in rounds), default=last.get("local_steps")),
        "rounds_participated": len(trained),
        "rounds": [r["round"] for r in trained],
        "declined": [{"round": r["round"], "reason": r.get("reason", "")} for r in rounds if r.get("declined")],
        "total_steps": sum(int(h[2]) for h in last["history"]),
        "delta": delta,
        "epsilon": _num(eps["epsilon"]), "accountant": eps["accountant"],
        "epsilon_rdp": _num(eps["epsilon_rdp"]), "best_alpha": eps["best_alpha"], "epsilon_prv": _num(eps["epsilon_prv"]),
        "history": [[float(s), float(q), int(n)] for s, q, n in last["history"]],
        "calibration": last.get("calibration"),
        "sampling": last.get("sampling", "poisson"), "noise_dtype": last.get("noise_dtype", "float32"),
        "epsilon_by_round": by_round,
        "recorded_epsilon": recorded, "consistent": consistent,
    }  # fmt: skip


def _client_level_section(view: LedgerView, accountant: str) -> dict[str, Any] | None:
    if not view.client_level:
        return None
    last = max(view.client_level, key=lambda e: sum(h[2] for h in e["history"]))
    delta = float(last["delta"])
    eps = _eps(last["history"], delta, accountant)
    return {
        "noise_multiplier": last.get("noise_multiplier"), "clip": last.get("clip"),
        "clients_per_round": sorted({e["clients"] for e in view.client_level}),
        "aggregated_per_round": [e.get("aggregated", e["clients"]) for e in view.client_level],
        "population": last.get("population"), "releases": sum(int(h[2]) for h in last["history"]),
        "noise_std_last": last.get("noise_std"), "delta": delta,
        "epsilon": _num(eps["epsilon"]), "accountant": eps["accountant"], "epsilon_rdp": _num(eps["epsilon_rdp"]),
        "best_alpha": eps["best_alpha"], "epsilon_prv": _num(eps["epsilon_prv"]),
        "history": [[float(s), float(q), int(n)] for s, q, n in last["history"]],
        "epsilon_by_round": [{"round": e["round"], "epsilon": _num(headline_epsilon(e["history"], delta, accountant))}
                             for e in view.client_level],
        "recorded_epsilon": last.get("epsilon"),
    }  # fmt: skip


def _threat_model(mode: str, secure_aggregation: bool) -> str:
    if mode == "client":
        return (
            "Trusted server: it sees every client's raw update, clips it and adds the noise. The guarantee "
            "protects each client's participation against everyone who sees the released global adapters "
            "(other clients, anyone given the final model), not against the server."
        )
    seen = ("only the sum of the updates (secure aggregation is on)" if secure_aggregation
            else "every client's per-round adapter update (secure aggregation is off)")  # fmt: skip
    return (
        f"Each client privatises its own updates (DP-SGD on the trainable adapter parameters), so the server, "
        f"which sees {seen}, other clients and anyone given the final adapter are all covered. Not covered: "
        "the reply's metadata (number of examples N_k, train loss, timings), which are sent in the clear. "
        "Noise comes from torch's generator seeded with 63 bits of OS entropy, not a CSPRNG (Opacus' "
        "secure_mode), and floating-point noise attacks (Mironov 2012) are not mitigated."
    )


def _statement(report: dict[str, Any]) -> str:
    mode = report["mode"]
    if mode == "client":
        cl = report["client_level"]
        return (
            f"Whether any one client took part in training changes the probability of any outcome an observer "
            f"of the released global adapters can see by at most a factor e^ε with ε = {cl['epsilon']:.3g}, "
            f"except with probability δ = {cl['delta']:.3g} ({cl['releases']} noisy rounds, z = "
            f"{cl['noise_multiplier']:.3g}, update clipped to C = {cl['clip']:g})."
            if isinstance(cl["epsilon"], float) else "The client-level noise was zero: there is no guarantee."
        )
    worst = report["worst_client"]
    if worst is None:
        return "No client trained under DP: nothing was released."
    eps = worst["epsilon"]
    if not isinstance(eps, float):
        return f"Client {worst['client']} trained without noise (σ = 0): there is no guarantee."
    return (
        f"For every client, adding or removing any single one of its training examples changes the probability "
        f"of anything that can be observed from that client's adapter updates by at most a factor e^ε, except "
        f"with probability δ. The least protected client ({worst['client']}) has ε = {eps:.3g} at "
        f"δ = {worst['delta']:.3g} over all {worst['rounds_participated']} rounds it trained; each client's own "
        "ε is listed below. Clients hold disjoint data, so these guarantees do not add up across clients."
    )


def build_privacy_report(run_dir: str | Path) -> dict[str, Any]:
    """The report as a JSON-ready dict, recomputed from the ledger with Opacus' accountants."""
    view = replay(read_ledger(run_dir))
    run = view.run
    accountant = run.get("accountant", "rdp")
    mode = run.get("mode") or ("client" if view.client_level and not view.clients else "example")
    clients = [_client_section(view, c, accountant) for c in sorted(view.clients, key=_client_key)]

    def worst_key(c: dict[str, Any]) -> float:
        return math.inf if c["epsilon"] == "inf" else float(c["epsilon"])

    trained = [c for c in clients if c["total_steps"] > 0]
    worst = max(trained, key=worst_key) if trained else None
    report: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(Path(run_dir).resolve()),
        "mode": mode,
        "privacy_unit": UNIT.get(mode, mode),
        "adjacency": ADJACENCY.get(mode, ""),
        "threat_model": _threat_model(mode, bool(run.get("secure_aggregation"))),
        "secure_aggregation": bool(run.get("secure_aggregation")),
        "headline_accountant": accountant,
        "settings": {k: v for k, v in run.items() if k not in ("kind", "time")},
        "sampling": {
            "poisson": all(c["sampling"] == "poisson" for c in clients) if clients else None,
            "note": "example level: each example joins each step's batch independently with probability q "
                    "(what the accountants assume); client level: Flower samples m clients uniformly without "
                    "replacement, accounted as Poisson at q = m/population (the usual approximation)",
        },  # fmt: skip
        "noise_dtype": "float32",
        "worst_client": None if worst is None else {
            k: worst[k] for k in ("client", "epsilon", "delta", "accountant", "rounds_participated")
        },  # fmt: skip
        "clients": clients,
        "declined": [{"client": c["client"], **d} for c in clients for d in c["declined"]],
        "client_level": _client_level_section(view, accountant),
        "versions": _versions(),
        "recomputed_with": "opacus.accountants.RDPAccountant (headline unless accountant=prv) and PRVAccountant, "
                           "from each client's recorded composition history (σ, q, steps)",
    }  # fmt: skip
    report["consistent"] = all(c["consistent"] for c in clients)
    report["statement"] = _statement(report)
    return report


def _client_key(c: str) -> tuple[int, str]:
    return (int(c), "") if c.isdigit() else (1 << 30, c)


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Privacy report ({report['mode']}-level DP)", "", report["statement"], ""]
    lines += [
        f"- **Privacy unit:** {report['privacy_unit']}; adjacency: {report['adjacency']}.",
        f"- **Threat model:** {report['threat_model']}",
        f"- **Headline accountant:** {report['headline_accountant'].upper()} (PRV shown beside it when it computes).",
        f"- **Sampling:** Poisson = {report['sampling']['poisson']}; {report['sampling']['note']}.",
        f"- **Noise dtype:** {report['noise_dtype']}.",
    ]
    if report["worst_client"]:
        w = report["worst_client"]
        lines.append(f"- **Worst client:** {w['client']}, ε = {_fmt(w['epsilon'])} at δ = {w['delta']:.3g}.")
    lines.append(f"- **Recomputed with:** {report['recomputed_with']}; matches what clients reported: "
                 f"{'yes' if report['consistent'] else 'NO'}.")  # fmt: skip
    if report["clients"]:
        lines += ["", "## Clients", "",
                  "| client | N_k | q | σ | C | batch (logical/physical) | local steps | rounds | steps | δ | ε RDP (α) | ε PRV |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in report["clients"]:
            lines.append(
                f"| {c['client']} | {c['num_examples']} | {_fmt(c['q'], '.4g')} | {_fmt(c['sigma'], '.4g')} | "
                f"{_fmt(c['clip'], 'g')} | {c['batch_size']}/{c['physical_batch_size']} | {c['local_steps']} | "
                f"{c['rounds_participated']} | {c['total_steps']} | {c['delta']:.3g} | "
                f"{_fmt(c['epsilon_rdp'])} ({_fmt(c['best_alpha'], 'g')}) | {_fmt(c['epsilon_prv'])} |"
            )  # fmt: skip
        lines += ["", "Composition histories (σ, q, steps), as given to Opacus' accountants:", ""]
        for c in report["clients"]:
            lines.append(f"- client {c['client']}: `{c['history']}`")
    if report["declined"]:
        lines += ["", "## Declined rounds", ""]
        lines += [f"- client {d['client']}, round {d['round']}: {d['reason']}" for d in report["declined"]]
    cl = report["client_level"]
    if cl:
        lines += ["", "## Client-level DP (server)", "",
                  f"z = {_fmt(cl['noise_multiplier'], '.4g')}, C = {_fmt(cl['clip'], 'g')}, m = {cl['clients_per_round']}, "
                  f"population = {cl['population']}, releases = {cl['releases']}, δ = {cl['delta']:.3g}, "
                  f"ε RDP = {_fmt(cl['epsilon_rdp'])} (α = {_fmt(cl['best_alpha'], 'g')}), ε PRV = {_fmt(cl['epsilon_prv'])}.",
                  "", f"History: `{cl['history']}`"]  # fmt: skip
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def plot_epsilon(report: dict[str, Any], path: str | Path) -> Path:
    """``epsilon.png``: each client's cumulative ε over rounds (declined rounds marked ×)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def finite(v: Any) -> float:
        return v if isinstance(v, float) else math.nan

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in report["clients"]:
        pts = c["epsilon_by_round"]
        line, = ax.plot([p["round"] for p in pts], [finite(p["epsilon"]) for p in pts], "o-", label=f"client {c['client']}")
        declined = [p for p in pts if p["declined"]]
        if declined:
            ax.plot([p["round"] for p in declined], [finite(p["epsilon"]) for p in declined], "x", color=line.get_color(), ms=10)
    if report["client_level"]:
        pts = report["client_level"]["epsilon_by_round"]
        ax.plot([p["round"] for p in pts], [finite(p["epsilon"]) for p in pts], "s-", label="client level (server)")
    settings = report["settings"]
    if settings.get("max_epsilon"):
        ax.axhline(settings["max_epsilon"], ls="--", color="gray", label="budget dp.max_epsilon")
    if settings.get("target_epsilon"):
        ax.axhline(settings["target_epsilon"], ls=":", color="gray", label="dp.target_epsilon")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"cumulative ε ({report['headline_accountant'].upper()})")
    ax.set_title(f"{report['mode']}-level DP: ε over rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_privacy_report(run_dir: str | Path) -> dict[str, Path]:
    """Write the three files into ``run_dir`` (each atomically); returns {json, markdown, plot}."""
    run_dir = Path(run_dir)
    report = build_privacy_report(run_dir)
    paths = {"json": run_dir / PRIVACY_REPORT_JSON, "markdown": run_dir / PRIVACY_REPORT_MD}
    for key, text in (("json", json.dumps(report, indent=2)), ("markdown", render_markdown(report))):
        tmp = paths[key].with_suffix(paths[key].suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(paths[key])
    tmp_plot = run_dir / (PRIVACY_PLOT_FILE + ".tmp.png")
    plot_epsilon(report, tmp_plot).replace(run_dir / PRIVACY_PLOT_FILE)
    paths["plot"] = run_dir / PRIVACY_PLOT_FILE
    return paths


def privacy_report_main(run_dir: str) -> None:
    """``fedlora privacy-report RUN_DIR``: (re)write the report from the run's ledger and say where."""
    if not Path(run_dir).is_dir():
        raise PrivacyError(f"{run_dir} is not a directory; give the run directory that holds {ledger_path('.').name}")
    paths = write_privacy_report(run_dir)
    report = json.loads(paths["json"].read_text())
    w = report["worst_client"]
    if w:
        print(f"fedlora: worst client {w['client']}: ε = {_fmt(w['epsilon'])} at δ = {w['delta']:.3g} ({w['accountant'].upper()})")
    if report["client_level"]:
        cl = report["client_level"]
        print(f"fedlora: client-level ε = {_fmt(cl['epsilon'])} at δ = {cl['delta']:.3g}")
    print(f"fedlora: wrote {', '.join(str(p) for p in paths.values())}", flush=True)
