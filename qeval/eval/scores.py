"""Mean and standard error, the one aggregation every native task reports.

Every qeval-native score is a mean over items (answers, cases, windows) stored with its
standard error, so a report can tell a loss from noise (``qeval.report`` marks differences
beyond two standard errors).  The formula is lm-eval's (``lm_eval.api.metrics.mean_stderr``:
sample standard deviation with ddof=1, over sqrt(n)), so native and lm-eval scores carry
comparable errors.  Plain Python floats, summed in item order, so the numbers do not depend on
a tensor library's reduction order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

NAN = float("nan")


def mean_variance(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample variance (ddof=1) and count of ``values`` exactly as given.

    A NaN propagates (perplexity uses this: a window whose NLL is NaN makes the score NaN
    instead of disappearing).  With no value the mean is NaN; with one, the variance is NaN.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return NAN, NAN, 0
    mean = sum(xs) / n
    if n == 1:
        return mean, NAN, 1
    return mean, sum((x - mean) ** 2 for x in xs) / (n - 1), n


def mean_stderr(values: Iterable[float | bool | None]) -> tuple[float, float, int]:
    """Mean, standard error of the mean and count of the *defined* values.

    ``None`` and NaN values (a metric undefined for that item, e.g. the repetition of an empty
    answer) are left out, so they count neither for nor against a model.  Booleans count as
    0/1 (accuracy).  With no value the mean is NaN; with one, the standard error is NaN (it
    cannot be estimated), as in lm-eval.
    """
    mean, var, n = mean_variance(float(v) for v in values if v is not None and not math.isnan(float(v)))
    return mean, (math.sqrt(var / n) if n > 1 else NAN), n
