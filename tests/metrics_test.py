"""Exact AUC, logloss and accuracy against brute-force definitions."""

import itertools

import numpy as np
import pytest

from dlrm_jax import metrics


def brute_force_auc(labels, scores):
  """P(score_pos > score_neg) + 0.5 P(tie) over every positive/negative pair."""
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize('seed', range(5))
def test_exact_auc_matches_pairwise_count_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(300) < 0.3
  # Few distinct scores, so many ties across classes.
  scores = rng.integers(0, 7, size=300) / 7.0
  assert metrics.exact_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores),
                                                            abs=1e-12)


def test_exact_auc_extremes_and_single_class():
  labels = np.array([0, 0, 1, 1])
  assert metrics.exact_auc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.exact_auc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert metrics.exact_auc(labels, [0.5] * 4) == 0.5
  assert np.isnan(metrics.exact_auc([1, 1], [0.2, 0.3]))


def test_logloss_and_accuracy_match_definitions():
  labels = np.array([1, 0, 1, 0])
  probs = np.array([0.9, 0.2, 0.4, 0.6])
  expected = -np.mean([np.log(0.9), np.log(0.8), np.log(0.4), np.log(0.4)])
  assert metrics.logloss(labels, probs) == pytest.approx(expected, rel=1e-12)
  assert metrics.accuracy(labels, probs) == 0.5
  # Clipping keeps a confident mistake finite.
  assert np.isfinite(metrics.logloss([1], [0.0]))
