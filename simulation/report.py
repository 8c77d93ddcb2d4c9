"""``summary.json``: the machine-readable result of a simulated federation.

Layout (tests and later tools rely on it)::

    {"rounds_completed": 2,
     "secure_aggregation": false,
     "sites": {"site-0": {"epsilon": 3.1, "delta": 1e-05, "epsilon_budget": 10.0,
                          "steps": 40, "status": "ok", "ledger": "sites/site-0/ledger.json"}},
     "rounds": [{"round": 1, "sites_trained": ["site-0", …], "loss_d_fake": 0.6, "loss_g": 0.7}, …],
     "checkpoints": "checkpoints", "samples": "samples",
     "evaluation": {"fd": 12.3, "kid": 0.01, "tstr_auc": 0.9, "tstr_acc": 0.8, "trtr_auc": 0.95,
                    "trtr_acc": 0.85, "memorization_rate": 0.0, …}}   # only with --reference

Each site's epsilon is recomputed here from its ledger file alone (the same function the
hospital uses), not copied from what the hospital reported; ``status`` is ``budget-exhausted``
if the hospital ever declined a round for lack of budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.ledger import PrivacyLedger
from common.atomic import write_json_atomic
from common.dp.warm_start import WARM_START_ROUND
from common.round_record import RECORDS_FILE, read_server_state


def site_summary(out: Path, site_id: str, ledger_path: Path, exhausted: bool) -> dict[str, Any]:
    """One site's entry, from its ledger; a site that never trained has no ledger yet."""
    if ledger_path.exists():
        ledger = PrivacyLedger.read(ledger_path)
        epsilon, delta, budget, steps = ledger.epsilon(), ledger.delta, ledger.epsilon_budget, ledger.total_steps
    else:
        epsilon, delta, budget, steps = 0.0, float("nan"), float("nan"), 0
    return {
        "epsilon": epsilon,
        "delta": delta,
        "epsilon_budget": budget,
        "steps": steps,
        "status": "budget-exhausted" if exhausted else "ok",
        "ledger": str(ledger_path.relative_to(out)),
    }


def build_summary(
    out: Path,
    site_ledgers: dict[str, Path],
    extra: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Combine the server's state (``server_state.json``) with every site's ledger.

    ``evaluation``: the result of ``common.evaluation.evaluate`` when the run was given a reference.
    """
    state = read_server_state(out / RECORDS_FILE)
    rounds = state.rounds if state is not None else ()
    stopped = state.stopped_early if state is not None else None
    attempted = [*rounds, *([stopped.last_round_attempted] if stopped is not None else [])]
    exhausted = {s for r in attempted for s in r.sites_budget_exhausted}
    summary: dict[str, Any] = {
        "rounds_completed": len([r for r in rounds if r.round != WARM_START_ROUND]),  # GAN rounds
        "secure_aggregation": state is not None and state.secure_aggregation,
        "stopped_early": stopped.reason if stopped is not None else None,
        "sites": {
            site: site_summary(out, site, path, site in exhausted) for site, path in sorted(site_ledgers.items())
        },
        "rounds": [
            {
                "round": r.round,
                "sites_trained": list(r.sites_trained),
                "sites_budget_exhausted": list(r.sites_budget_exhausted),
                "loss_d_fake": None if r.metrics is None else r.metrics.loss_d_fake,
                "loss_g": None if r.metrics is None else r.metrics.loss_g,
                "failures": list(r.failures),
                "seconds": r.seconds,
            }
            for r in rounds
        ],
        "checkpoints": "checkpoints",
        "samples": "samples",
        **(extra or {}),
    }
    if evaluation is not None:
        summary["evaluation"] = evaluation
    write_json_atomic(out / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any], out: Path) -> str:
    """What the user reads at the end of a run."""
    lines = [f"rounds completed: {summary['rounds_completed']}"]
    if summary.get("stopped_early"):
        lines.append(f"stopped early: {summary['stopped_early']}")
    if summary.get("differential_privacy") is False:
        lines.append("privacy: NONE — trained without differential privacy (--no-dp); a reference, never to share")
    else:
        lines.append("privacy spent per hospital (patient level):")
        lines += [f"  {site}: ε = {s['epsilon']:.3f} of budget {s['epsilon_budget']:g} at δ = {s['delta']:g}, "
                  f"{s['steps']} DP steps, status {s['status']}" for site, s in summary["sites"].items()]
    evaluation = summary.get("evaluation")
    if evaluation:
        from common.evaluation.evaluate import format_evaluation

        lines += ["evaluation against the reference:", format_evaluation(evaluation)]
    lines += [
        f"results:   {out}",
        f"  report   {out / 'report.html'}",
        f"  summary  {out / 'summary.json'}",
        f"  samples  {out / 'samples'}",
        f"  models   {out / 'checkpoints'}",
    ]
    return "\n".join(lines)
