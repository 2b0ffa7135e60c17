"""How well a guard separates safe from unsafe: precision, recall, F1, FPR at a threshold, and the threshold-free
AUPRC, ROC AUC and TPR at a fixed FPR, overall and per Llama Guard category.

Definitions (plain Python, checked against scikit-learn's in the tests)
- At a threshold: flagged = score >= threshold. Precision TP/(TP+FP), recall TP/(TP+FN), F1 their harmonic mean,
  FPR FP/(FP+TN); a ratio with nothing under it is 0.0 (scikit-learn's `zero_division=0`).
- AUPRC is average precision, sum over distinct scores (high to low) of (R_n - R_{n-1}) * P_n: scikit-learn's
  `average_precision_score`, which, unlike the trapezoid under the PR curve, does not reward interpolating between
  operating points (Davis & Goadrich 2006, "The Relationship Between Precision-Recall and ROC Curves"). Tied scores
  form one operating point.
- ROC AUC: the chance a random positive scores above a random negative, ties counting one half (Mann-Whitney U).
- TPR at FPR x: the best recall over thresholds whose FPR is at most x - how Prompt Guard reports "recall at 1% FPR".
- Per category (the Llama Guard 3 / 4 model cards report per-category figures the same way): the row for code c
  holds the unsafe records carrying c (positives) and every safe record (negatives); unsafe records of other
  categories say nothing about c and are left out of that row. A positive counts as caught when its unsafe score
  reaches the threshold. With `named=True`, `evaluate_guard` also runs classify's short generation on flagged
  records and reports `named_recall`: the share of c's positives that were flagged AND named c.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def confusion(labels: Sequence[bool], flagged: Sequence[bool]) -> tuple[int, int, int, int]:
    """(TP, FP, TN, FN)."""
    pairs = list(zip(labels, flagged, strict=True))
    tp = sum(y and f for y, f in pairs)
    fp = sum((not y) and f for y, f in pairs)
    fn = sum(y and not f for y, f in pairs)
    return tp, fp, len(pairs) - tp - fp - fn, fn


def at_threshold(labels: Sequence[bool], flagged: Sequence[bool]) -> dict[str, float]:
    tp, fp, tn, fn = confusion(labels, flagged)
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "fpr": _ratio(fp, fp + tn)}


def _operating_points(labels: Sequence[bool], scores: Sequence[float]) -> list[tuple[int, int]]:
    """(TP, FP) flagging everything at or above each distinct score, from the highest score down."""
    pts, tp, fp, prev = [], 0, 0, None
    for s, y in sorted(zip(scores, labels, strict=True), key=lambda x: -x[0]):
        if prev is not None and s != prev:
            pts.append((tp, fp))
        tp, fp, prev = tp + bool(y), fp + (not y), s
    return [*pts, (tp, fp)] if prev is not None else []


def average_precision(labels: Sequence[bool], scores: Sequence[float]) -> float:
    pos = sum(map(bool, labels))
    ap, last_recall = 0.0, 0.0
    for tp, fp in _operating_points(labels, scores):
        recall = _ratio(tp, pos)
        ap += (recall - last_recall) * _ratio(tp, tp + fp)
        last_recall = recall
    return ap


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = sorted(s for s, y in zip(scores, labels, strict=True) if not y)
    if not pos or not neg:
        return float("nan")  # undefined with one class (scikit-learn raises)
    import bisect

    wins = sum(bisect.bisect_left(neg, s) + 0.5 * (bisect.bisect_right(neg, s) - bisect.bisect_left(neg, s))
               for s in pos)
    return wins / (len(pos) * len(neg))


def tpr_at_fpr(labels: Sequence[bool], scores: Sequence[float], max_fpr: float = 0.01) -> float:
    pos, neg = sum(map(bool, labels)), len(labels) - sum(map(bool, labels))
    return max((_ratio(tp, pos) for tp, fp in _operating_points(labels, scores) if _ratio(fp, neg) <= max_fpr),
               default=0.0)


@dataclass(frozen=True)
class Row:
    name: str  # "overall", or "S1 Violent Crimes"
    positives: int
    negatives: int
    precision: float
    recall: float
    f1: float
    fpr: float
    auprc: float
    auc: float
    named_recall: float | None = None  # flagged and named this category (evaluate_guard with named=True)


def row(name: str, labels: Sequence[bool], scores: Sequence[float], threshold: float,
        named: Sequence[bool] | None = None) -> Row:
    """One table row; `named[i]`: positive i was flagged and its category named."""
    flagged = [s >= threshold for s in scores]
    m = at_threshold(labels, flagged)
    pos = sum(map(bool, labels))
    return Row(name, pos, len(labels) - pos, m["precision"], m["recall"], m["f1"], m["fpr"],
               average_precision(labels, scores), roc_auc(labels, scores),
               None if named is None else _ratio(sum(named), pos))


def evaluate_guard(guard, records: Sequence, threshold: float = 0.5, named: bool = False) -> list[Row]:
    """The table for a herd.safety.guard.Guard over herd.safety.datasets.SafetyRecords: overall, prompts and
    responses apart (when both are there), then one row per category code present (in code order)."""
    from herd.safety.taxonomy import LG4

    scores, said = [], []
    for r in records:
        if named:
            v = guard.classify(r.messages(), threshold)
            scores.append(v.score)
            said.append(set(v.categories))
        else:
            scores.append(guard.unsafe_score(r.messages()))
    return table(records, scores, threshold, said if named else None, {c.code: c.name for c in LG4})


def table(records: Sequence, scores: Sequence[float], threshold: float, said: Sequence[set] | None = None,
          names: dict[str, str] | None = None) -> list[Row]:
    """evaluate_guard's table from scores already computed (and the codes the guard named, if it was asked)."""
    names = names or {}
    labels = [r.unsafe for r in records]
    rows = [row("overall", labels, scores, threshold)]
    for mode, name in (("user", "prompts (User mode)"), ("agent", "responses (Agent mode)")):
        keep = [i for i, r in enumerate(records) if getattr(r, "mode", None) == mode]
        if 0 < len(keep) < len(records):  # a guard can be good at one job and not the other
            rows.append(row(name, [labels[i] for i in keep], [scores[i] for i in keep], threshold))
    for code in sorted({c for r in records for c in r.codes}, key=lambda c: int(c[1:])):
        keep = [i for i, r in enumerate(records) if not r.unsafe or code in r.codes]
        lab = [labels[i] for i in keep]
        got = None if said is None else [scores[i] >= threshold and code in said[i] for i in keep if labels[i]]
        rows.append(row(f"{code} {names.get(code, '')}".strip(), lab, [scores[i] for i in keep], threshold, got))
    return rows


def markdown_table(rows: Sequence[Row]) -> str:
    cols = [f.name for f in fields(Row) if f.name != "named_recall" or any(r.named_recall is not None for r in rows)]
    fmt = [(getattr(r, c) if not isinstance(getattr(r, c), float) else f"{getattr(r, c):.3f}") for r in rows
           for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(x) for x in fmt[i:i + len(cols)]) + " |" for i in range(0, len(fmt), len(cols))]
    return "\n".join(lines)
