"""`ntkcl_jax.report`'s seed statistics: the paired difference and the NTK scalars compare.py
tabulates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from ntkcl_jax import report


def test_paired_difference_is_the_one_sample_t_interval_of_the_differences():
  values, baseline = [70.1, 69.0, 71.3, 70.4, 69.9], [69.2, 68.8, 70.0, 69.9, 69.5]
  d = np.subtract(values, baseline)
  got = report.paired_difference(values, baseline)
  low, high = scipy.stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=scipy.stats.sem(d))
  assert got["n"] == 5 and got["mean"] == pytest.approx(d.mean())
  assert (got["low"], got["high"]) == pytest.approx((low, high))
  assert got["low"] > 0  # every seed improved by 0.2-1.3: the interval excludes 0
  one = report.paired_difference([1.0], [0.5])
  assert one["mean"] == 0.5 and math.isnan(one["low"]) and math.isnan(one["high"])
  with pytest.raises(ValueError, match="equal-length"):
    report.paired_difference([], [])


def test_ntk_scalars_read_the_last_task_end():
  nan = None  # summary.json writes NaN as null
  summary = {
    "ntk": {
      "points": ["init", "task_end_0", "task_end_1"],
      "mean_inter_ratio": {"init": nan, "task_end_0": nan, "task_end_1": 0.81},
      "intra_retention": [[1.0, nan], [0.93, 1.0]],
      "output_drift": [[0.0, nan], [0.02, 0.0]],
      "forgetting": {"correlation_pairs": {"pearson": nan}},
    }
  }
  got = report.ntk_scalars(summary)
  assert got["rho_bar"] == 0.81 and got["retention_0"] == 0.93 and got["drift_0"] == 0.02
  assert math.isnan(got["predictor_r"])
  assert report.ntk_scalars({"last_acc": 1.0}) == {}
