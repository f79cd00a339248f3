"""Evaluation metrics computed on the host over a whole eval set: exact AUC, accuracy, logloss;
and the JSON files results are written to.

The reference reports a 1000-threshold approximate AUC (tf.metrics.auc); we report the exact
rank-based AUC (Mann-Whitney U with tied scores sharing their average rank), which is what the
planted data's oracle AUC is computed with too, so the two compare directly.
"""

import json
import os

import numpy as np


def exact_auc(labels, scores) -> float:
  """Area under the ROC curve; ties in `scores` count one half. NaN if one class is absent.

  Counted from the scores in order, run by run of tied scores: each positive beats the
  negatives of the runs below its own and ties with those of its run. About 33 bytes a row of
  float32 scores at the peak, beside the inputs (np.unique's tie-averaged ranks took ~74: 13 GB
  for the 178M rows of Criteo 1TB's eval day).
  """
  labels = np.asarray(labels).reshape(-1) > 0.5
  scores = np.asarray(scores).reshape(-1)
  if scores.dtype.kind != 'f':
    scores = scores.astype(np.float64)
  if labels.shape != scores.shape:
    raise ValueError(f'labels {labels.shape} and scores {scores.shape} differ in shape')
  num_pos = int(labels.sum())
  num_neg = labels.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float('nan')
  order = np.argsort(scores)  # the order within a run of ties does not matter
  ranked = scores[order]
  hits = labels[order]
  del order
  new_run = np.empty(ranked.size, bool)
  new_run[0] = True
  np.not_equal(ranked[1:], ranked[:-1], out=new_run[1:])
  if np.isnan(ranked[-1]):  # NaNs sort last: one run, as np.unique counts them
    new_run[np.searchsorted(np.isnan(ranked), True) + 1:] = False
  del ranked
  starts = np.flatnonzero(new_run)
  del new_run
  pos = np.add.reduceat(hits, starts, dtype=np.int64)
  neg = np.diff(starts, append=hits.size)
  neg -= pos
  below = np.cumsum(neg, out=starts)  # negatives up to and including each run
  below -= neg
  # Exact in int64: every sum is at most num_pos * num_neg.
  wins = int(np.dot(pos, below)) + 0.5 * int(np.dot(pos, neg))
  return float(wins / (num_pos * num_neg))


# Rows per piece of the logloss: float64 temporaries of a piece, not of the whole eval set.
_LOGLOSS_ROWS = 1 << 20


def logloss(labels, probs, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy of probabilities, clipped to [eps, 1 - eps] as Keras does."""
  labels = np.asarray(labels).reshape(-1)
  probs = np.asarray(probs).reshape(-1)
  total = 0.0
  for start in range(0, labels.size, _LOGLOSS_ROWS):
    y = labels[start:start + _LOGLOSS_ROWS].astype(np.float64)
    p = np.clip(probs[start:start + _LOGLOSS_ROWS].astype(np.float64), eps, 1.0 - eps)
    total -= float(np.sum(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
  return total / labels.size if labels.size else float('nan')


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


def write_text_atomic(path: str, text: str) -> None:
  """Write to a temporary name, then rename: a crash or kill never leaves a half-written file,
  and a failed write leaves the old one (and no temporary file)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path: str, obj) -> None:
  """`obj` (non-finite floats as null, numpy scalars as numbers) to `path`, atomically."""
  write_text_atomic(path, json.dumps(json_ready(obj), indent=2, sort_keys=True, default=float)
                    + '\n')


def archive_previous(path: str, history_path: str, unreadable_key: str) -> None:
  """Appends the JSON file at `path`, if there is one, to `history_path` as one line (its text
  under `unreadable_key` when it does not parse): a file about to be replaced stays on record.
  Never raises over a damaged old file: the new one matters more."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    text = f.read()
  try:
    previous = json.loads(text)
  except ValueError:
    previous = {unreadable_key: text}
  line = (json.dumps(json_ready(previous), sort_keys=True, default=float) + '\n').encode()
  with open(history_path, 'a+b') as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - len(line) - 1))
    tail = f.read()
    if tail[-len(line) - 1:] in (line, b'\n' + line):
      # On record already: a kill came between this append and the file's replacement (or an
      # evaluation gave the same results again, which a second line would only count).
      return
    # A kill in the middle of an append leaves a cut line; the next record starts a line of its own.
    f.write((b'\n' if tail and not tail.endswith(b'\n') else b'') + line)
    f.flush()
    os.fsync(f.fileno())
