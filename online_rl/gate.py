"""The evaluation gate: is a candidate fit to replace the active version?

It reads the numbers `online_rl.evaluate.compare` measured on held-out
prompts and passes a candidate only when every check holds:

- **no NaN** anywhere in its scores, KL or language figures;
- **it beat its parent under its own reward model** (``win_rate`` above
  `min_win_rate`; ties, as when it writes what the active version writes,
  are no win): a candidate that did not climb the reward it was trained
  on learned nothing worth judging;
- **and is not worse under evidence the update did not optimize**: the
  judge, a reward model trained on other thumbs, does not prefer the active
  version by more than `judge_se` standard errors of its win rate (checked
  when the judge is informative: its AUC's 95% interval lies above 0.5), and
  on rated held-out replies it does not move away from what people liked
  (the thumbs margin is not below zero by more than two standard errors).
  Both are tests of "not worse", as the canary's is: the judge is trained on
  a fifth of the thumbs and its win rate sits within a few hundredths of
  0.5 for any candidate near its parent, so a bar at 0.5 itself decided by
  the judge's noise (docs/learning.md, "The judge: not worse, not better");
- **close to the base**: KL to the base at most `max_kl` nats *per token*
  (a taste for longer replies does not pay KL for its length);
- **still language, judged against the base** (so drift cannot build up
  round after round): the base model's excess NLL per token of its replies
  (`online_rl.language`: each token's NLL less what the base's own choice
  costs it at the same position, 0 for the base's own replies) at most
  `max_nll_increase` of the base's own NLL per token (or `nll_slack` nats,
  where that is more: on prompts a base knows by heart 10% is noise), and
  its known-word share at most `max_known_words_drop` below theirs. The
  plain NLL per token is reported beside it but not bounded: it rises for
  short replies and falls for long ones with no word less likely, so a
  bound on it turned away a taste for short replies for its length;
- **not degenerate**: enough distinct replies across the prompts, against
  the base's own (one reply for every prompt is reward hacking, not
  learning), no single reply taking over and no ten of them together
  taking much more of the prompts than the base's ten, few empty
  replies, and not many more replies cut off at the reply cap than the
  active version has.

Every failed check adds a reason in plain words; a candidate that fails is
marked rejected with them. An operator can still promote it by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GateConfig:
    min_win_rate: float = 0.5  # under the reward model PPO optimized
    min_judge_win_rate: float = 0.5  # under the judge, a reward model the update never saw ...
    # ... less this many standard errors of the judge's win rate (over the
    # held-out prompts). At 0 the judge's point estimate decides: of 14
    # candidates that bar turned away with the judge alone in the taste
    # suite, 13 were better on the true taste than the version serving and
    # one equal (docs/learning.md).
    judge_se: float = 2.0
    # Nats per reply token, mean over held-out replies: about 3 nats for a
    # reply of the starter's typical ten tokens. The language is bounded by
    # its own checks below; this bound keeps a candidate near the base when
    # those checks pass. At 0.2, candidates rejected for their KL alone had
    # kept their language (base NLL per token 4% above the base's own, or
    # below it; docs/learning.md), and it was the bound every taste that
    # learned at all reached first.
    max_kl: float = 0.3
    # The excess NLL per token may be at most this share of the base's own
    # NLL per token (0.045 nats on the starter) ...
    max_nll_increase: float = 0.10
    # ... or this many nats where that is more: on prompts the base knows by
    # heart its own replies cost it about 0.01 nats per token, where 10% is
    # noise. Not added to the 10%: at the starter's 0.45 that would allow 14%.
    nll_slack: float = 0.02
    max_known_words_drop: float = 0.04  # known-word share, below the base's own replies
    # One reply per held-out prompt: the share of distinct replies at least
    # this share of the base's own on the same prompts (0.87-1.0 on the
    # starter), and no single reply over `max_top_share` of them (the base's
    # most common reply: about 3%). A reply the taste likes anywhere spreads
    # to prompts it does not answer: on a taste for the first person one
    # reply came to 40% of the prompts, 34% of them distinct, and both old
    # bounds (30% distinct, a reply at most half) let it pass.
    min_distinct: float = 0.6
    max_top_share: float = 0.25
    # The ten most common replies, together, at most this much more of the
    # held-out prompts than the base's ten most common take. The two bounds
    # above hold back each single reply, not ten together: on a taste for
    # computers ten stock replies came to 46% of a candidate's replies (the
    # base's ten: 11%) and held 78% of the liked ones, each under the bound
    # on one reply (docs/benchmarks.md). Tastes that learned in their own
    # words moved this share by 0.11-0.15 on the benchmark's prompts.
    max_top_ten_increase: float = 0.2
    max_empty: float = 0.2  # share of empty replies
    max_cut_off_increase: float = 0.25  # more replies cut off at the cap than the active version has
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
    win_rate, kl = evaluation.get("win_rate"), evaluation.get("kl_per_token")
    judge = evaluation.get("judge_win_rate")
    judge_used = judge is not None and bool(evaluation.get("judge_informative"))
    judge_se = evaluation.get("judge_win_rate_se") or 0.0
    judge_bar = config.min_judge_win_rate - config.judge_se * judge_se
    nll = evaluation.get("base_nll") or {}
    excess = evaluation.get("excess_nll") or {}
    known = evaluation.get("known_words") or {}
    thumbs = evaluation.get("heldout_thumbs") or {}

    if prompts < config.min_prompts:
        reasons.append(f"only {prompts} held-out prompts (at least {config.min_prompts} needed to judge)")
    if evaluation.get("nan"):
        reasons.append("NaN in the candidate's scores, KL or language figures")
    if win_rate is None or win_rate <= config.min_win_rate:
        reasons.append(f"it did not beat {active} under its own reward model: win rate {_fmt(win_rate, 3)} "
                       f"(more than {config.min_win_rate:.2f} needed)")
    if judge_used and judge < judge_bar:
        reasons.append(f"the judge (a reward model the update never saw) prefers {active}: win rate {_fmt(judge, 3)} "
                       f"(at least {judge_bar:.3f}: {config.min_judge_win_rate:.2f} less {config.judge_se:g} "
                       f"standard errors of {judge_se:.3f})")
    margin, se = thumbs.get("margin"), thumbs.get("se")
    if margin is not None and se is not None and margin < -2 * se:
        reasons.append(f"on rated held-out replies it moved away from what people liked "
                       f"(margin {margin:.3f} nats per token, standard error {se:.3f})")
    if kl is None or kl > config.max_kl:
        reasons.append(f"KL to the base {_fmt(kl, 3)} nats per token is above the bound of {config.max_kl:g}")
    cand_nll, base_nll = nll.get("candidate"), nll.get("base")
    cand_excess, base_excess = excess.get("candidate"), excess.get("base")
    excess_bound = (None if base_nll is None or base_excess is None
                    else base_excess + max(base_nll * config.max_nll_increase, config.nll_slack))
    if cand_excess is not None and excess_bound is not None and cand_excess > excess_bound:
        reasons.append(f"its language drifted: the base model's excess NLL per token of its replies (above its own "
                       f"choices at the same positions) is {cand_excess:+.3f}, above the bound of {excess_bound:+.3f} "
                       f"({config.max_nll_increase:.0%} of the base's own NLL per token {base_nll:.3f}, or "
                       f"{config.nll_slack:g} nats; the base's own excess {base_excess:+.3f})")
    cand_known, base_known = known.get("candidate"), known.get("base")
    if cand_known is not None and base_known is not None and cand_known < base_known - config.max_known_words_drop:
        reasons.append(f"its language drifted: {cand_known:.0%} of its words are known words, against "
                       f"{base_known:.0%} for the base")
    distinct = cand.get("distinct_fraction")
    base_distinct = (evaluation.get("base") or {}).get("distinct_fraction")
    distinct_floor = config.min_distinct * (1.0 if base_distinct is None else base_distinct)
    if distinct is not None and distinct < distinct_floor:
        reasons.append(f"degenerate: only {distinct:.0%} of its replies are distinct (at least {distinct_floor:.0%}, "
                       f"{config.min_distinct:.0%} of the base's own)")
    top = cand.get("top_reply_share")
    if top is not None and top > config.max_top_share:
        reasons.append(f"degenerate: one reply is {top:.0%} of all replies (at most {config.max_top_share:.0%})")
    top_ten, base_top_ten = cand.get("top_ten_share"), (evaluation.get("base") or {}).get("top_ten_share")
    top_ten_bound = None if base_top_ten is None else base_top_ten + config.max_top_ten_increase
    if top_ten is not None and top_ten_bound is not None and top_ten > top_ten_bound:
        reasons.append(f"degenerate: its ten most common replies are {top_ten:.0%} of its replies, against "
                       f"{base_top_ten:.0%} for the base (at most {top_ten_bound:.0%}): a few stock replies said "
                       "to prompts they do not answer")
    empty = cand.get("empty_fraction")
    if empty is not None and empty > config.max_empty:
        reasons.append(f"degenerate: {empty:.0%} empty replies (at most {config.max_empty:.0%})")
    cut, act_cut = cand.get("cut_off_fraction"), act.get("cut_off_fraction", 0.0)
    if cut is not None and cut > (act_cut or 0.0) + config.max_cut_off_increase:
        reasons.append(f"degenerate: {cut:.0%} of its replies are cut off at the reply cap, against "
                       f"{act_cut:.0%} for {active}")

    checks = {"prompts": prompts, "win_rate": win_rate, "judge_win_rate": judge, "judge_win_rate_se": judge_se,
              "judge_bar": judge_bar, "judge_used": judge_used,
              "thumbs_margin": margin, "thumbs_margin_se": se, "kl_per_token": kl,
              "base_nll": cand_nll, "base_nll_of_base": base_nll, "excess_nll": cand_excess,
              "excess_nll_of_base": base_excess, "excess_nll_bound": excess_bound, "known_words": cand_known,
              "known_words_of_base": base_known, "nan": bool(evaluation.get("nan")),
              "distinct_fraction": distinct, "distinct_floor": distinct_floor, "top_reply_share": top,
              "top_ten_share": top_ten, "top_ten_share_of_base": base_top_ten, "top_ten_bound": top_ten_bound,
              "empty_fraction": empty,
              "cut_off_fraction": cut, "active_cut_off_fraction": act_cut, "config": asdict(config)}
    return Verdict(passed=not reasons, reasons=reasons, checks=checks)


def check_canary_share(share: float) -> float:
    """The `--canary` share, checked: 0 (off) up to below 1."""
    if not 0 <= share < 1:
        raise ValueError("--canary is a share of new conversations: 0 (off) up to below 1, e.g. 0.1")
    return share


def apply(store, version: str, evaluation: dict, config: GateConfig | None = None, *,
          canary: float = 0.0) -> Verdict:
    """Decide on a registered candidate and record the outcome in the registry:
    active (a logged promotion by the gate) or rejected with the reasons.
    With `canary` above 0 a candidate that passes is not promoted but put on
    canary on that share of new conversations (`storage.trials`): live
    thumbs decide (`chatbot.live_trials`).

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
    passed = (f"passed the gate against {current}: win rate {_fmt(evaluation.get('win_rate'))}, "
              f"judge {_fmt(evaluation.get('judge_win_rate'))}, "
              f"KL {_fmt(evaluation.get('kl_per_token'), 3)} nats per token")
    if verdict.passed and canary:
        store.start_canary(version, canary, reason=passed)
    elif verdict.passed:
        store.promote(version, action="gate", actor="gate", reason=passed)
    else:
        store.set_adapter_status(version, "rejected", reason=verdict.reason())
    return verdict


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
