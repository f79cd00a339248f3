"""Evaluation metrics computed on the host over a whole eval set: exact AUC, accuracy, logloss.

The reference reports a 1000-threshold approximate AUC (tf.metrics.auc); we report the exact
rank-based AUC (Mann-Whitney U with tied scores sharing their average rank), which is what the
planted data's oracle AUC is computed with too, so the two compare directly.
"""

import numpy as np


def exact_auc(labels, scores) -> float:
  """Area under the ROC curve; ties in `scores` count one half. NaN if one class is absent."""
  labels = np.asarray(labels).reshape(-1) > 0.5
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  if labels.shape != scores.shape:
    raise ValueError(f'labels {labels.shape} and scores {scores.shape} differ in shape')
  num_pos = int(labels.sum())
  num_neg = labels.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float('nan')
  # 1-based ranks, tied scores sharing the mean of the ranks they span.
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  upper = np.cumsum(counts)
  mean_rank = upper - (counts - 1) / 2.0
  rank_sum_pos = mean_rank[inverse][labels].sum()
  return float((rank_sum_pos - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def logloss(labels, probs, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy of probabilities, clipped to [eps, 1 - eps] as Keras does."""
  labels = np.asarray(labels, np.float64).reshape(-1)
  probs = np.clip(np.asarray(probs, np.float64).reshape(-1), eps, 1.0 - eps)
  return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs)))


def accuracy(labels, probs, threshold: float = 0.5) -> float:
  labels = np.asarray(labels).reshape(-1) > 0.5
  return float(np.mean((np.asarray(probs).reshape(-1) > threshold) == labels))


def classification_metrics(labels, probs) -> dict:
  """The eval metrics the run reports: auc, accuracy, logloss, plus counts for context."""
  labels = np.asarray(labels).reshape(-1)
  probs = np.asarray(probs).reshape(-1)
  return {
      'auc': exact_auc(labels, probs),
      'accuracy': accuracy(labels, probs),
      'logloss': logloss(labels, probs),
      'num_examples': int(labels.size),
      'positive_rate': float(np.mean(labels > 0.5)) if labels.size else float('nan'),
  }


def json_ready(value):
  """`value` with non-finite floats as None (JSON null): JSON has no NaN, and an undefined
  metric (the AUC of rows of one class) must still leave a file every JSON reader can parse."""
  if isinstance(value, dict):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, (float, np.floating)) and not np.isfinite(value):
    return None
  return value
