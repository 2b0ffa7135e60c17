"""Guard metrics against hand-computed values (and scikit-learn's): a small confusion, AUPRC and ROC AUC on a ranked
list with ties, TPR at 1% FPR, the per-category rows and evaluate_guard over a stand-in guard.

Run: .venv/bin/python -m pytest tests/safety/test_metrics.py -q
"""

from __future__ import annotations

import random

import pytest
from sklearn import metrics as skm

from herd.safety import GuardVerdict
from herd.safety.datasets import SafetyRecord
from herd.safety.metrics import (
    at_threshold,
    average_precision,
    confusion,
    evaluate_guard,
    markdown_table,
    roc_auc,
    table,
    tpr_at_fpr,
)

LABELS = [True, True, False, True, False, False]
SCORES = [0.9, 0.8, 0.8, 0.5, 0.3, 0.3]  # a positive and a negative tie at 0.8, two negatives at 0.3


def test_threshold_metrics_on_a_small_confusion():
    flagged = [s >= 0.5 for s in SCORES]
    assert confusion(LABELS, flagged) == (3, 1, 2, 0)
    m = at_threshold(LABELS, flagged)
    assert m == pytest.approx({"precision": 3 / 4, "recall": 1.0, "f1": 6 / 7, "fpr": 1 / 3})
    assert at_threshold([False, False], [False, False]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "fpr": 0.0}


def test_ranking_metrics_with_ties_by_hand():
    # operating points (TP, FP): 0.9 -> (1, 0); 0.8 -> (2, 1) as one point; 0.5 -> (3, 1); 0.3 -> (3, 3)
    assert average_precision(LABELS, SCORES) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)
    # positives beat 3, 2.5 (a tie counts half) and 2 of the 3 negatives
    assert roc_auc(LABELS, SCORES) == pytest.approx(7.5 / 9)
    assert tpr_at_fpr(LABELS, SCORES, 0.01) == pytest.approx(1 / 3)  # only the 0.9 threshold has no false positive
    assert tpr_at_fpr(LABELS, SCORES, 1 / 3) == pytest.approx(1.0)


def test_against_scikit_learn_on_random_lists_with_ties():
    rng = random.Random(0)
    for _ in range(20):
        labels = [rng.random() < 0.3 for _ in range(60)] + [True, False]
        scores = [round(rng.random(), 1) for _ in labels]  # coarse scores: many ties
        assert average_precision(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores))
        assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
        fpr, tpr, _ = skm.roc_curve(labels, scores)
        best = max(t for f, t in zip(fpr, tpr, strict=True) if f <= 0.05)
        assert tpr_at_fpr(labels, scores, 0.05) == pytest.approx(best)
        flagged = [s >= 0.5 for s in scores]
        p, r, f1, _ = skm.precision_recall_fscore_support(labels, flagged, average="binary", zero_division=0)
        got = at_threshold(labels, flagged)
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f1))


def _rec(unsafe, codes=(), prompt="p"):
    return SafetyRecord(prompt, None, unsafe, codes, "test", "MIT")


RECORDS = [_rec(True, ("S1",)), _rec(True, ("S1", "S10")), _rec(True, ("S10",)), _rec(False), _rec(False)]
RSCORES = [0.9, 0.4, 0.7, 0.6, 0.1]


def test_prompts_and_responses_get_rows_of_their_own():
    records = [_rec(True, ("S1",)), _rec(False), SafetyRecord("p", "an answer", True, ("S1",), "test", "MIT"),
               SafetyRecord("p", "a refusal", False, (), "test", "MIT")]
    rows = table(records, [0.9, 0.8, 0.2, 0.1], 0.5)
    assert [r.name for r in rows] == ["overall", "prompts (User mode)", "responses (Agent mode)", "S1"]
    _, user, agent, _ = rows
    assert (user.positives, user.negatives, user.recall, user.fpr) == (1, 1, 1.0, 1.0)
    assert (agent.positives, agent.negatives, agent.recall, agent.fpr) == (1, 1, 0.0, 0.0)


def test_per_category_rows_hold_that_category_and_every_safe_record():
    rows = table(RECORDS, RSCORES, 0.5, names={"S1": "Violent Crimes", "S10": "Hate"})
    assert [r.name for r in rows] == ["overall", "S1 Violent Crimes", "S10 Hate"]
    overall, s1, s10 = rows
    assert (overall.positives, overall.negatives, overall.recall, overall.fpr) == (3, 2, pytest.approx(2 / 3), 0.5)
    # S1: positives 0.9 (caught) and 0.4 (missed); negatives 0.6 (flagged) and 0.1; S10's own record is left out
    assert (s1.positives, s1.negatives, s1.recall, s1.precision) == (2, 2, 0.5, 0.5)
    assert s1.auc == pytest.approx(roc_auc([True, True, False, False], [0.9, 0.4, 0.6, 0.1]))
    assert (s10.positives, s10.recall) == (2, 0.5) and s1.named_recall is None


class StandIn:
    """A guard with fixed scores and named categories, to check evaluate_guard's wiring."""

    def __init__(self, scores, named):
        self.scores, self.named = dict(scores), dict(named)

    def unsafe_score(self, messages):
        return self.scores[messages[-1]["content"]]

    def classify(self, messages, threshold):
        s = self.unsafe_score(messages)
        return GuardVerdict(s < threshold, self.named[messages[-1]["content"]] if s >= threshold else (), s)


def test_evaluate_guard_and_named_recall():
    recs = [_rec(r.unsafe, r.codes, f"p{i}") for i, r in enumerate(RECORDS)]
    guard = StandIn({f"p{i}": s for i, s in enumerate(RSCORES)},
                    {"p0": ("S10",), "p1": ("S1",), "p2": ("S10",), "p3": ("S1",), "p4": ()})
    assert evaluate_guard(guard, recs) == table(recs, RSCORES, 0.5, names={"S1": "Violent Crimes", "S10": "Hate"})
    rows = evaluate_guard(guard, recs, named=True)
    by = {r.name.split()[0]: r for r in rows}
    assert by["S1"].named_recall == 0.0  # p0 was flagged but named S10; p1 named S1 but scored under the threshold
    assert by["S10"].named_recall == 0.5  # p2 flagged and named S10; p1 not flagged
    md = markdown_table(rows)
    assert md.splitlines()[0].startswith("| name | positives |") and "named_recall" in md
    assert "| S1 Violent Crimes | 2 | 2 | 0.500 |" in md
