"""The promotion gate: may a candidate model become current?

Judged on the evaluation the worker wrote into the candidate's marker
(engine/worker/evaluation.py): for every earlier source, the relative rise of
the eval loss from the starting model to the candidate must stay within
`eval.max_forgetting`; on the file's own held-out lines the loss must fall by
more than `eval.min_improvement`. A candidate without an evaluation fails: with
the gate on, no model becomes current unmeasured. What the daemon does with a
failing verdict (`hold`: keep it as a version, not current; `warn`: publish and
alert) is engine/supervisor/outcomes.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.core.config import EvalConfig


@dataclass
class Verdict:
    ok: bool
    problems: list[str] = field(default_factory=list)
    worst: dict[str, Any] | None = None  # the largest forgetting: {source, before, after, change}
    unchanged: bool = False  # measured exactly as its starting model: training did not move it

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


def change(before: float, after: float) -> float:
    return (after - before) / before if before else 0.0


def unchanged(evaluated: dict[str, Any]) -> bool:
    """Did the candidate measure exactly as its starting model did on every source? Then training did not move
    it, and no threshold says anything about the file."""
    pairs = [((f.get("before") or {}).get("loss"), (f.get("after") or {}).get("loss"))
             for f in evaluated["sources"].values()]
    pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
    return bool(pairs) and all(b == a for b, a in pairs)


def percent(change: float | None) -> str:
    """A relative change as a signed percentage with the digits it needs: '+38%' from 10% up, else two
    significant digits ('+3.2%', '-0.41%', '-0.040%'), so a small change never reads '-0%'; '0%' for
    none, '' when unknown. The gate's reasons, `traind quality`, `traind eval` and the UI's quality view all write it so."""
    if change is None:
        return ""
    if change == 0:
        return "0%"
    points = abs(change) * 100
    decimals = 0 if points >= 10 else max(1, 1 - math.floor(math.log10(points)))
    return f"{change * 100:+.{decimals}f}%"


def judge(evaluated: dict[str, Any] | None, config: EvalConfig) -> Verdict:
    if not isinstance(evaluated, dict) or not isinstance(evaluated.get("sources"), dict):
        return Verdict(False, ["not evaluated: the candidate carries no evaluation"])
    if unchanged(evaluated):
        return Verdict(False, [f"unchanged: the candidate's eval loss equals its starting model's on every source "
                               f"({len(evaluated['sources'])}): its training did not move the model"], unchanged=True)
    own = evaluated.get("own")
    problems, worst = [], None
    for name, figures in evaluated["sources"].items():
        before, after = (figures.get("before") or {}).get("loss"), (figures.get("after") or {}).get("loss")
        if figures.get("after") is not None and after is None:
            problems.append(f"a non-finite eval loss on {name}")
            continue
        if before is None or after is None:
            continue
        rise = change(before, after)
        if name == own:
            if -rise <= config.min_improvement:
                problems.append(f"no improvement on its own held-out lines: eval loss {before:.4g} -> {after:.4g} "
                                f"({percent(rise)}; needs a fall of more than {config.min_improvement:.0%})")
            continue
        if worst is None or rise > worst["change"]:
            worst = {"source": name, "before": before, "after": after, "change": rise}
        if rise > config.max_forgetting:
            problems.append(f"forgetting: eval loss on {name} {before:.4g} -> {after:.4g}, {percent(rise)} > "
                            f"{config.max_forgetting:.0%}")
    return Verdict(not problems, problems, worst)


def summary(evaluated: dict[str, Any] | None) -> dict[str, Any] | None:
    """A version's evaluation in a few numbers, for snapshot listings: how many sources, its own held-out
    loss and how much its file lowered it, and its largest change on an earlier source (a rise: forgetting)."""
    if not isinstance(evaluated, dict) or not isinstance(evaluated.get("sources"), dict):
        return None
    verdict = judge(evaluated, EvalConfig(gate="off"))
    figures = evaluated["sources"].get(evaluated.get("own")) or {}
    own, started = figures.get("after") or {}, (figures.get("before") or {}).get("loss")
    worst = verdict.worst or {}
    own_change = change(started, own["loss"]) if started and own.get("loss") is not None else None
    return {"sources": len(evaluated["sources"]), "own_loss": own.get("loss"), "own_change": own_change,
            "worst_source": worst.get("source"), "worst_change": worst.get("change")}
