"""The evaluation gate: is a candidate fit to replace the active version?

It reads the numbers `online_rl.evaluate.compare` measured on held-out
prompts and passes a candidate only when every check holds:

- **no NaN** anywhere in its scores or KL;
- **not worse**: the reward model's win rate against the active version is at
  least `min_win_rate` (0.5: it wins at least as often as it loses);
- **close to the base**: mean KL to the base per reply at most `max_kl` nats.
  Approval won far from the base is how babble shows up first;
- **not degenerate**: enough distinct replies (one reply for every prompt is
  reward hacking, not learning), no single reply taking over, few empty
  replies, and not many more replies cut off without an end token than the
  active version has.

Every failed check adds a reason in plain words; a candidate that fails is
marked rejected with them. An operator can still promote it by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GateConfig:
    min_win_rate: float = 0.5
    max_kl: float = 12.0  # nats per reply, mean over held-out prompts
    min_distinct: float = 0.3  # share of distinct replies among the held-out prompts
    max_top_share: float = 0.5  # share of the single most common reply
    max_empty: float = 0.2  # share of empty replies
    max_cut_off_increase: float = 0.25  # more replies without an end token than the active version has
    min_prompts: int = 4  # fewer held-out prompts than this: too little evidence to promote


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    checks: dict

    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "passed every check"

    def as_dict(self) -> dict:
        return {"passed": self.passed, "reason": self.reason(), "checks": self.checks}


def decide(evaluation: dict, config: GateConfig | None = None, *, active: str = "the active version") -> Verdict:
    """Judge one candidate from its evaluation; `active` names the version it was compared with."""
    config = config or GateConfig()
    reasons: list[str] = []
    cand = evaluation.get("candidate") or {}
    act = evaluation.get("active") or {}
    prompts = evaluation.get("prompts") or 0
    win_rate, kl = evaluation.get("win_rate"), evaluation.get("kl_to_base")

    if prompts < config.min_prompts:
        reasons.append(f"only {prompts} held-out prompts (at least {config.min_prompts} needed to judge)")
    if evaluation.get("nan"):
        reasons.append("NaN in the candidate's scores or KL")
    if win_rate is None or win_rate < config.min_win_rate:
        reasons.append(f"win rate {_fmt(win_rate)} against {active} is below {config.min_win_rate:.2f}")
    if kl is None or kl > config.max_kl:
        reasons.append(f"KL to the base {_fmt(kl)} nats is above the bound of {config.max_kl:g}")
    distinct = cand.get("distinct_fraction")
    if distinct is not None and distinct < config.min_distinct:
        reasons.append(f"degenerate: only {distinct:.0%} of its replies are distinct "
                       f"(at least {config.min_distinct:.0%})")
    top = cand.get("top_reply_share")
    if top is not None and top > config.max_top_share:
        reasons.append(f"degenerate: one reply is {top:.0%} of all replies (at most {config.max_top_share:.0%})")
    empty = cand.get("empty_fraction")
    if empty is not None and empty > config.max_empty:
        reasons.append(f"degenerate: {empty:.0%} empty replies (at most {config.max_empty:.0%})")
    cut, act_cut = cand.get("cut_off_fraction"), act.get("cut_off_fraction", 0.0)
    if cut is not None and cut > (act_cut or 0.0) + config.max_cut_off_increase:
        reasons.append(f"degenerate: {cut:.0%} of its replies never end, against {act_cut:.0%} for {active}")

    checks = {"prompts": prompts, "win_rate": win_rate, "kl_to_base": kl, "nan": bool(evaluation.get("nan")),
              "distinct_fraction": distinct, "top_reply_share": top, "empty_fraction": empty,
              "cut_off_fraction": cut, "active_cut_off_fraction": act_cut, "config": asdict(config)}
    return Verdict(passed=not reasons, reasons=reasons, checks=checks)


def apply(store, version: str, evaluation: dict, config: GateConfig | None = None) -> Verdict:
    """Decide on a registered candidate and record the outcome in the registry:
    active (a logged promotion by the gate) or rejected with the reasons.

    The candidate must have been compared with the version active now; if an
    operator changed the active version in the meantime, it is left a
    candidate for them to decide.
    """
    compared_with = evaluation.get("active_version")
    current = store.active_version()
    if compared_with is not None and compared_with != current:
        return Verdict(False, [f"it was evaluated against {compared_with}, but {current} became active "
                               "meanwhile; left as a candidate"], {})
    verdict = decide(evaluation, config, active=current)
    if verdict.passed:
        store.promote(version, action="gate", actor="gate",
                      reason=f"passed the gate against {current}: win rate {_fmt(evaluation.get('win_rate'))}, "
                             f"KL {_fmt(evaluation.get('kl_to_base'))} nats")
    else:
        store.set_adapter_status(version, "rejected", reason=verdict.reason())
    return verdict


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"
