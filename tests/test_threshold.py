from __future__ import annotations

import numpy as np
import pytest

from kernel_lib.config import ThresholdRule
from kernel_lib.threshold import apply_threshold, sweep_thresholds


def test_fixed_rule_and_nan_scores():
    scores = np.array([0.9, np.nan, 0.5, 0.49])
    assert apply_threshold(scores, ThresholdRule("fixed", 0.5)).tolist() == [True, False, True,
                                                                            False]


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.25, 1), (0.5, 2), (1.0, 3)])
def test_quantile_rule_counts_and_skips_failures(fraction, expected):
    scores = np.array([0.1, 0.8, np.nan, 0.3])
    positive = apply_threshold(scores, ThresholdRule("quantile", fraction))
    assert positive.sum() == min(expected, 3)
    assert not positive[2]
    if expected:
        assert positive[1]


def test_sweep_finds_the_separating_threshold():
    truth = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1, 0.75, 0.35])

    def evaluate(positive):
        tp = (positive & truth).sum()
        fp = (positive & ~truth).sum()
        fn = (~positive & truth).sum()
        return 5 * tp / (5 * tp + 4 * fn + fp) if tp + fp + fn else 0.0

    result = sweep_thresholds(scores, evaluate)
    assert result.f2 == 1.0
    assert apply_threshold(scores, result.rule).tolist() == truth.tolist()
    value, f2 = result.best("quantile")
    assert f2 == 1.0 and value == pytest.approx(0.5)
    fixed_value, _ = result.best("fixed")
    assert 0.35 < fixed_value < 0.7
    assert result.rule.kind == "quantile"  # both kinds reach 1.0: the quantile is preferred
    result_fixed = sweep_thresholds(scores, evaluate, prefer="fixed")
    assert result_fixed.rule.kind == "fixed"
    assert apply_threshold(scores, result_fixed.rule).tolist() == truth.tolist()
    with pytest.raises(ValueError, match="prefer"):
        sweep_thresholds(scores, evaluate, prefer="best")


def test_sweep_with_all_nan_scores_does_not_crash():
    result = sweep_thresholds(np.array([np.nan, np.nan]), lambda p: float(p.sum() == 0))
    assert result.f2 == 1.0
