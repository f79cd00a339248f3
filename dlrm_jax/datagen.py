"""Planted click data in the exact Ali ELM and Criteo file formats, with its known best AUC.

The real files cannot be downloaded here, so we draw rows of the same format from a click model
we choose (the "planted" model). Because the true click probability of every row is known, the
best AUC and logloss any model can reach on a file (the oracle) are known too, and a trained
model is judged against them.

  python -m dlrm_jax.datagen elm --out_dir DIR --train_rows N --eval_rows M --seed S \
      [--interaction_weight W --linear_weight W --history_weight W --target_ctr P ...]
  python -m dlrm_jax.datagen criteo --out_dir DIR --train_rows N --eval_rows M --seed S [--gzip]

writes `train.csv` / `eval.csv` (ELM) or `train.txt` / `eval.txt` (Criteo), then `oracle.json`.
Python: `generate_elm`, `generate_criteo`, `ensure_planted_data` (reuses a complete data set with
the same parameters), `true_probabilities` (recomputes every row's true probability from a file).

ELM planted model (`PlantedModel`; defaults in brackets)
--------------------------------------------------------
Entities. Users [20000], items [5000], shops [1000], categories [40], standard foods [1500],
brands [300], cities [8], districts [60], AOIs [400]. Every item has one food (and through it
one category), one shop (and through it one city, district, AOI, geohash and brand; 30% of shops
have no brand, 10% no AOI) and one price, so the columns about an item never contradict each
other. Users and candidate items are drawn from finite Zipf laws, p(rank k) ~ (k + 1)^-s
[users s=0.6, items s=0.9], over a random order of the ids.

The logit of a row (user u, candidate item i of category c, shop s, brand b) is
  intercept
  + interaction_weight [0.6] * (<f_u, g_i> + <f_u, h_c>) / sqrt(2 + 2 rho)          (pairwise)
  + linear_weight [1.0] * (  a_u + a_i + a_s + a_c + a_b                           (per-id)
                             - 0.6 |log(price_i / avg_price_u)|                    (price fit)
                             + hour_effect[hours] - 0.1 log(rank_7_i)              (context)
                             + 0.2 is_supervip + 0.1 [gender == 2] )               (user)
  + history_weight [1.0] * (1.5 m_item + 0.75 m_shop + 0.5 m_category)             (history)
where
- f_u ~ N(0, I/d) and h_c ~ N(0, I) are latent factors of dimension d = latent_dim [8], and
  g_i = rho h_c + sqrt(1 - rho^2) e_i with e_i ~ N(0, I) and rho = 0.5 (items resemble their
  category). For a popularity-drawn candidate the bracket has unit variance, so
  interaction_weight is the pairwise term's standard deviation (re-ordered candidates, picked for
  taste, make it about 1.25x larger in the data). interaction_weight = 0 removes every
  latent-factor product: the logit is then first order in the ids plus the history-match and
  dense terms.
- a_u ~ N(0, 0.35^2), a_i ~ N(0, 0.3^2), a_s ~ N(0, 0.2^2), a_c ~ N(0, 0.2^2), a_b ~ N(0, 0.15^2)
  (0 for no brand).
- The price fit compares the item's price with the user's avg_price as written in the file (the
  only dense x id cross, deliberately under linear_weight: it uses no latent factors).
- hour_effect (`_HOUR_EFFECT`): a time_type level (lunch +0.15, dinner +0.10, tea -0.05,
  breakfast -0.15, night -0.20) plus +0.10 at the meal peaks 11, 12 and 18 h. time_type is a
  function of hours (breakfast 5-9, lunch 10-13, tea 14-16, dinner 17-20, night 21-4).
- m_item, m_shop, m_category: the fraction of the row's history events whose item / shop /
  category equals the candidate's (0 for an empty history). A mean-pooled history embedding
  dotted with the candidate's embedding can express exactly this.
- The intercept is solved (bisection on 32768 rows of its own random stream) so that the mean
  true probability is target_ctr [0.04]. Labels are Bernoulli(sigmoid(logit)).
Weekdays, times, timediffs, visit_city, geohashes and the other ids carry no effect of their own.
The layout is the real files' (39 fields, no header, `;` lists); some values are drawn
differently: `times` is a small count here where the real column holds the request time (nearly
one distinct value, so one table row, per row: planted batches touch ~8% fewer unique rows), a
missing value is an empty field where the real files also write -99 or -1 (the reader takes
both, as DeepRec's does: an empty scalar id is left out, a -1 is hashed), and timediffs are in
hours (the real unit is not documented).
At the defaults the oracle AUC on 200k rows is 0.77-0.80 over seeds 0-3 (0.69-0.70 with
interaction_weight=0); the oracle logloss is about 0.143 against 0.167 for a constant CTR.

History. Each user owns a pool of max_history [50] past events. The user considers 256 items
drawn by popularity; each pool event is one of them, drawn with probability
~ exp(history_sharpness [2.0] * <f_u, g_i> - 2 |log(price_i / q_u)|) (q_u ~ 20 exp(N(0, 0.3^2)):
the user's preferred price), so histories reveal the user's taste and price level even for users
seen a few times. A row's history is a contiguous window of the pool: empty with
probability empty_history_rate [0.05], else geometric of mean mean_history / (1 - rate) [10]
clipped to max_history. All twelve history lists hold the same events in the same order (shop,
item, category, food, brand ('0' when none), price, AOI, geohash6, timediff in hours, hours,
time_type, weekday). With probability repeat_rate [0.15] the candidate is an item of the
user's pool (a re-order), else a popularity draw. The user's avg_price is the mean price of the
pool, ctr_30 ~ Poisson(3 exp(2 a_u)) (so it reveals the user's bias), ord_30 ~ Poisson(1 + 0.3
ctr_30), total_amt_30 ~ ord_30 * avg_price; gender is 1 or 2, empty (the reader's -99) for
missing_gender_rate [0.05] of users; rank_7/30/90 are the item's popularity rank with
multiplicative noise.

Criteo planted model (`CriteoPlantedModel`)
-------------------------------------------
C1..C26 ids are Zipf [s=1.05] over per-column vocabularies (3 .. 20000) with per-column missing
rates (empty fields, C19-C26 often); I1..I13 are floored log-normal counts with per-column
missing rates, and I2 is negative (-1..-3) for 5% of rows. The logit is
  intercept + interaction_weight * sum_{(a, b) in pairs} <F_a[x_a], F_b[x_b]> / sqrt(#pairs)
            + linear_weight * (sum_c a_c[x_c] + sum_j w_j log1p(max(I_j, 0)) / sigma_j)
with F ~ N(0, I/sqrt(d)) (each product has unit variance), a_c ~ N(0, 0.1^2), a missing id
contributing 0, and the dense weights w_j in `_CRITEO_DENSE`. target_ctr defaults to 0.25, about
Criteo Kaggle's click rate.

Determinism and speed. Everything comes from numpy Generators seeded by
SeedSequence(seed, spawn_key=...): one stream for the world, one for the intercept, and one per
(split, chunk of 8192 rows), so a file depends only on (seed, parameters, row count) and its
full chunks do not depend on the row count. Text is built without a Python loop over rows: every
token a file can hold is laid out once in one byte buffer, a chunk of rows is one numpy gather of
(start, length) segments of it, and a writer thread overlaps the disk with the next chunk.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import functools
import gzip
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from dlrm_jax import feature_spec as fs
from dlrm_jax import metrics

# Bump when a change to this file changes the bytes written for the same parameters: data sets
# recorded with another version are regenerated rather than reused.
GENERATOR_VERSION = 1

CHUNK_ROWS = 8192
ORACLE_FILE = 'oracle.json'
# Written before the data files and never removed: the names of the data files datagen has
# written in its directory, which generate() may rewrite (an interrupted regeneration has no
# oracle.json yet). Releases before it listed names left it empty.
PLANTED_MARKER = '.planted'
READERS_LOCK = '.readers.lock'  # held shared by the runs reading the data (ReadersLock)
FILE_NAMES = {'elm': ('train.csv', 'eval.csv'), 'criteo': ('train.txt', 'eval.txt')}

# Random streams (SeedSequence spawn keys).
_WORLD_STREAM = 0
_CALIBRATION_STREAM = 1
_ROWS_STREAM = 2
_CALIBRATION_ROWS = 32768

# Integers the files can hold are pre-rendered once in this range; generated values are clipped
# into it (Criteo's I2 goes down to -3).
_INT_LO = -16
_INT_HI = 1 << 17

# ------------------------------------------------------------------------------------------------
# ELM planted model.

_ITEM_CATEGORY_RHO = 0.5
_USER_BIAS_STD = 0.35
_ITEM_BIAS_STD = 0.3
_SHOP_BIAS_STD = 0.2
_CATEGORY_BIAS_STD = 0.2
_BRAND_BIAS_STD = 0.15
_PRICE_FIT = 0.6
_RANK_EFFECT = 0.1
_SUPERVIP_EFFECT = 0.2
_GENDER_2_EFFECT = 0.1
_HISTORY_ITEM, _HISTORY_SHOP, _HISTORY_CATEGORY = 1.5, 0.75, 0.5
_HISTORY_PRICE_SHARPNESS = 2.0
_CONSIDERATION_SET = 256
_NO_BRAND_RATE = 0.3
_NO_AOI_RATE = 0.1
_SUPERVIP_RATE = 0.15

# Ordering activity by hour of day: peaks at lunch and dinner.
_HOUR_WEIGHTS = np.array([0.6, 0.3, 0.2, 0.1, 0.1, 0.2, 0.8, 1.5, 2.0, 1.8, 3.0, 6.0,
                          6.5, 3.5, 2.0, 2.0, 2.5, 5.0, 6.0, 4.0, 2.5, 2.0, 1.5, 1.0])
_HOUR_CDF = np.cumsum(_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())


def _time_type_of_hour() -> np.ndarray:
  """Index into fs.ELM_TIME_TYPES of each hour 0..23."""
  names = []
  for hour in range(24):
    if 5 <= hour <= 9:
      names.append('breakfast')
    elif 10 <= hour <= 13:
      names.append('lunch')
    elif 14 <= hour <= 16:
      names.append('tea')
    elif 17 <= hour <= 20:
      names.append('dinner')
    else:
      names.append('night')
  return np.array([fs.ELM_TIME_TYPES.index(n) for n in names])


_HOUR_TIME_TYPE = _time_type_of_hour()
_TIME_TYPE_EFFECT = {'lunch': 0.15, 'dinner': 0.10, 'tea': -0.05, 'breakfast': -0.15,
                     'night': -0.20}
_HOUR_EFFECT = np.array(
    [_TIME_TYPE_EFFECT[fs.ELM_TIME_TYPES[t]] for t in _HOUR_TIME_TYPE]) + 0.10 * np.isin(
        np.arange(24), (11, 12, 18))

_GEOHASH_ALPHABET = np.frombuffer(b'0123456789bcdefghjkmnpqrstuvwxyz', 'S1')


@dataclasses.dataclass(frozen=True)
class PlantedModel:
  """The ELM click model (module docstring): vocabularies, term weights and history shape.

  Attributes:
    num_users, num_items, num_shops, num_categories, num_foods, num_brands, num_cities,
      num_districts, num_aois: vocabulary sizes of the entities.
    latent_dim: dimension of the user / item / category factors of the pairwise term.
    user_zipf, item_zipf: Zipf exponents of how often users and candidate items appear.
    interaction_weight: standard deviation of the pairwise latent term (0 removes it).
    linear_weight: multiplier of the per-id biases and dense effects.
    history_weight: multiplier of the history-match term.
    target_ctr: the mean true click probability the intercept is solved for.
    max_history: events in each user's pool, the longest history list.
    mean_history: mean history length over rows, empty ones included (before clipping).
    empty_history_rate: fraction of rows whose history lists are all empty.
    history_sharpness: how strongly pool items follow the user's latent taste.
    repeat_rate: fraction of candidates drawn from the user's own pool.
    missing_gender_rate: fraction of users whose gender field is empty.
  """
  num_users: int = 20000
  num_items: int = 5000
  num_shops: int = 1000
  num_categories: int = 40
  num_foods: int = 1500
  num_brands: int = 300
  num_cities: int = 8
  num_districts: int = 60
  num_aois: int = 400
  latent_dim: int = 8
  user_zipf: float = 0.6
  item_zipf: float = 0.9
  interaction_weight: float = 0.6
  linear_weight: float = 1.0
  history_weight: float = 1.0
  target_ctr: float = 0.04
  max_history: int = 50
  mean_history: float = 10.0
  empty_history_rate: float = 0.05
  history_sharpness: float = 2.0
  repeat_rate: float = 0.15
  missing_gender_rate: float = 0.05

  def __post_init__(self):
    # The id ranges below are fixed digit counts; keep sizes well inside them.
    limits = dict(num_users=10**7, num_items=10**8, num_shops=10**6, num_categories=500,
                  num_foods=10**5, num_brands=10**5, num_cities=500, num_districts=5000,
                  num_aois=10**5)
    for name, limit in limits.items():
      if not 1 <= getattr(self, name) <= limit:
        raise ValueError(f'PlantedModel.{name}={getattr(self, name)} must be in [1, {limit}]')
    if self.num_districts < self.num_cities:
      raise ValueError('PlantedModel needs num_districts >= num_cities')
    if not 0.0 < self.target_ctr < 1.0:
      raise ValueError(f'PlantedModel.target_ctr={self.target_ctr} must be in (0, 1)')
    if self.max_history < 1 or self.latent_dim < 1:
      raise ValueError('PlantedModel needs max_history >= 1 and latent_dim >= 1')
    for name in ('empty_history_rate', 'repeat_rate', 'missing_gender_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'PlantedModel.{name}={getattr(self, name)} must be in [0, 1)')
    if not 1.0 <= self.mean_history / (1.0 - self.empty_history_rate):
      raise ValueError('PlantedModel needs mean_history / (1 - empty_history_rate) >= 1')


# ------------------------------------------------------------------------------------------------
# Criteo planted model.

_CRITEO_VOCAB = (1000, 500, 20000, 10000, 200, 20, 5000, 400, 3, 8000, 3000, 15000, 2000, 25,
                 4000, 12000, 10, 1500, 1200, 4, 14000, 15, 14, 6000, 60, 3000)
_CRITEO_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
                   0.0, 0.03, 0.0, 0.0, 0.4, 0.4, 0.03, 0.75, 0.0, 0.03, 0.4, 0.4)
_CRITEO_PAIRS = ((0, 1), (0, 4), (1, 7), (6, 12), (3, 9), (13, 17))
_CRITEO_BIAS_STD = 0.1
_CRITEO_NEGATIVE_I2_RATE = 0.05
# Per dense column: (mu, sigma) of log(count), missing rate, weight w_j of log1p(count) / sigma.
_CRITEO_DENSE = np.array([
    (0.7, 1.0, 0.45, 0.20), (2.0, 1.5, 0.00, -0.10), (2.5, 1.2, 0.20, 0.10),
    (1.8, 0.9, 0.20, -0.15), (7.5, 1.8, 0.03, 0.10), (3.5, 1.5, 0.20, -0.10),
    (1.5, 1.2, 0.04, 0.15), (2.3, 1.0, 0.00, 0.05), (3.8, 1.3, 0.04, -0.10),
    (0.3, 0.6, 0.45, 0.20), (0.8, 0.9, 0.04, 0.10), (0.3, 0.8, 0.76, 0.10),
    (2.0, 1.0, 0.20, -0.05)])


@dataclasses.dataclass(frozen=True)
class CriteoPlantedModel:
  """The Criteo click model (module docstring).

  Attributes:
    vocab_sizes: ids per categorical column C1..C26.
    missing_rates: fraction of empty fields per categorical column.
    interaction_pairs: 0-based column pairs whose latent factors multiply.
    zipf: Zipf exponent of every categorical column.
    latent_dim: dimension of the latent factors.
    interaction_weight: multiplier of the pairwise term (0 removes it).
    linear_weight: multiplier of the per-id biases and dense effects.
    target_ctr: the mean true click probability the intercept is solved for.
  """
  vocab_sizes: Tuple[int, ...] = _CRITEO_VOCAB
  missing_rates: Tuple[float, ...] = _CRITEO_MISSING
  interaction_pairs: Tuple[Tuple[int, int], ...] = _CRITEO_PAIRS
  zipf: float = 1.05
  latent_dim: int = 8
  interaction_weight: float = 1.0
  linear_weight: float = 1.0
  target_ctr: float = 0.25

  def __post_init__(self):
    # JSON gives lists back; keep the fields hashable tuples.
    object.__setattr__(self, 'vocab_sizes', tuple(int(v) for v in self.vocab_sizes))
    object.__setattr__(self, 'missing_rates', tuple(float(v) for v in self.missing_rates))
    object.__setattr__(self, 'interaction_pairs',
                       tuple((int(a), int(b)) for a, b in self.interaction_pairs))
    n = fs.CRITEO_NUM_SPARSE
    if len(self.vocab_sizes) != n or len(self.missing_rates) != n:
      raise ValueError(f'CriteoPlantedModel needs {n} vocab_sizes and missing_rates')
    if min(self.vocab_sizes) < 1 or max(self.vocab_sizes) > 1 << 24:
      raise ValueError('CriteoPlantedModel.vocab_sizes must be in [1, 2^24]')
    if any(not 0.0 <= r < 1.0 for r in self.missing_rates):
      raise ValueError('CriteoPlantedModel.missing_rates must be in [0, 1)')
    if any(not (0 <= a < n and 0 <= b < n and a != b) for a, b in self.interaction_pairs):
      raise ValueError('CriteoPlantedModel.interaction_pairs must name two distinct columns')
    if not 0.0 < self.target_ctr < 1.0:
      raise ValueError(f'CriteoPlantedModel.target_ctr={self.target_ctr} must be in (0, 1)')


PLANTED_MODELS = {'elm': PlantedModel, 'criteo': CriteoPlantedModel}
Planted = Union[PlantedModel, CriteoPlantedModel]


def planted_model(kind: str, planted: Union[Planted, Dict[str, Any], None] = None,
                  **overrides) -> Planted:
  """The planted model of `kind`: defaults, a dict of fields, or a model, with `overrides`."""
  if kind not in PLANTED_MODELS:
    raise ValueError(f"kind={kind!r}: expected 'elm' or 'criteo'")
  cls = PLANTED_MODELS[kind]
  if planted is None:
    planted = cls()
  elif isinstance(planted, dict):
    planted = cls(**planted)
  elif not isinstance(planted, cls):
    raise TypeError(f'{kind} data needs a {cls.__name__}, got {type(planted).__name__}')
  return dataclasses.replace(planted, **overrides) if overrides else planted


# ------------------------------------------------------------------------------------------------
# Text as (start, length) segments of one byte buffer.


@dataclasses.dataclass(frozen=True)
class _Tokens:
  """Byte strings inside a buffer: token k is buffer[start[k] : start[k] + length[k]]."""
  start: np.ndarray
  length: np.ndarray

  def __getitem__(self, index) -> '_Tokens':
    return _Tokens(self.start[index], self.length[index])


class _TokenPool:
  """Appends byte strings to a growing buffer and says where each one landed."""

  def __init__(self):
    self._parts: List[np.ndarray] = []
    self.size = 0

  def add_bytes(self, blob: np.ndarray) -> int:
    start = self.size
    self._parts.append(blob)
    self.size += blob.size
    return start

  def add(self, strings: Sequence[str]) -> _Tokens:
    encoded = [s.encode('ascii') for s in strings]
    lengths = np.fromiter(map(len, encoded), np.int64, count=len(encoded))
    start = self.add_bytes(np.frombuffer(b''.join(encoded), np.uint8))
    return _Tokens(start + np.cumsum(lengths) - lengths, lengths)

  def array(self) -> np.ndarray:
    joined = np.concatenate(self._parts) if self._parts else np.zeros(0, np.uint8)
    self._parts = [joined]
    return joined


def _gather(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """buffer[s : s + l] for every (s, l), concatenated in order."""
  starts = starts.reshape(-1).astype(np.int64, copy=False)
  lengths = lengths.reshape(-1).astype(np.int64, copy=False)
  ends = np.cumsum(lengths)
  total = int(ends[-1]) if ends.size else 0
  index = np.repeat(starts - (ends - lengths), lengths)
  index += np.arange(total, dtype=np.int64)
  # take(mode='clip') skips the bounds checks of buffer[index] (every index is in range).
  return np.take(buffer, index, mode='clip')


def _join_rows(buffer: np.ndarray, fields: Sequence[_Tokens], delimiter: int,
               newline: int) -> bytes:
  """One line per row: the fields' tokens separated by the delimiter, ended by a newline."""
  n, k = fields[0].start.size, len(fields)
  starts = np.empty((n, 2 * k), np.int64)
  lengths = np.ones((n, 2 * k), np.int64)
  for j, field in enumerate(fields):
    starts[:, 2 * j] = field.start
    lengths[:, 2 * j] = field.length
  starts[:, 1::2] = delimiter
  starts[:, -1] = newline
  return _gather(buffer, starts, lengths).tobytes()


def _list_positions(pool: _TokenPool, source: np.ndarray, events: _Tokens,
                    separator: int) -> np.ndarray:
  """Appends each user's events joined by `separator`; returns where each event starts.

  Returns int64 [users, events + 1]: column k is the start of event k; the last column is one
  past the final separator, so events [a, b) of user u are buffer[pos[u, a] : pos[u, b] - 1].
  """
  users, count = events.start.shape
  starts = np.stack([events.start, np.full_like(events.start, separator)], -1)
  lengths = np.stack([events.length, np.ones_like(events.length)], -1)
  base = pool.add_bytes(_gather(source, starts, lengths))
  ends = np.cumsum(events.length.reshape(-1) + 1).reshape(users, count) + base
  return np.concatenate([ends - events.length - 1, ends[:, -1:]], axis=1)


# ------------------------------------------------------------------------------------------------
# Small numeric helpers.


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _zipf_probs(n: int, exponent: float) -> np.ndarray:
  p = (np.arange(n) + 1.0)**-exponent
  return p / p.sum()


def _cdf(probs: np.ndarray) -> np.ndarray:
  cdf = np.cumsum(probs)
  return cdf / cdf[-1]


def _sample_cdf(rng: np.random.Generator, cdf: np.ndarray, size) -> np.ndarray:
  return np.minimum(np.searchsorted(cdf, rng.random(size), side='right'), cdf.size - 1)


def _sample(rng: np.random.Generator, probs: np.ndarray, size) -> np.ndarray:
  return _sample_cdf(rng, _cdf(probs), size)


def _unique_ids(rng: np.random.Generator, n: int, digits: int) -> List[str]:
  """n distinct decimal ids of `digits` digits, like the real data's numeric ids."""
  low = 10**(digits - 1) if digits > 1 else 1
  return [str(x) for x in low + rng.choice(10**digits - low, size=n, replace=False)]


def _random_strings(rng: np.random.Generator, prefixes: np.ndarray, length: int) -> np.ndarray:
  """Each prefix followed by `length` random geohash characters."""
  chars = _GEOHASH_ALPHABET[rng.integers(0, 32, (prefixes.size, length))]
  tails = chars.view(f'S{length}').reshape(-1)
  return np.char.add(prefixes.astype('S'), tails)


def _pick_member(rng: np.random.Generator, owner_group: np.ndarray, member_group: np.ndarray,
                 num_groups: int) -> np.ndarray:
  """For each owner, a uniformly drawn member of the same group (-1 when the group is empty)."""
  order = np.argsort(member_group, kind='stable')
  counts = np.bincount(member_group, minlength=num_groups)
  first = np.cumsum(counts) - counts
  count = counts[owner_group]
  pick = first[owner_group] + (rng.random(owner_group.size) * count).astype(np.int64)
  return np.where(count > 0, order[np.minimum(pick, max(order.size - 1, 0))], -1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-z))


def _rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise dot product, summed elementwise so a row's value never depends on its batch.

  (A BLAS or pairwise reduction may round differently for another batch size; the oracle and
  `true_probabilities` must agree to the last bit.)
  """
  total = a[:, 0] * b[:, 0]
  for k in range(1, a.shape[1]):
    total = total + a[:, k] * b[:, k]
  return total


def _solve_intercept(logits: np.ndarray, target: float) -> float:
  """The b with mean(sigmoid(logits + b)) = target (bisection; the mean is monotone in b)."""
  lo, hi = -40.0, 40.0
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    if _sigmoid(logits + mid).mean() < target:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def _floats_as_written(values: np.ndarray, fmt: str) -> Tuple[List[str], np.ndarray]:
  """The strings written for `values`, and the values a reader parses back from them."""
  strings = [fmt % v for v in values]
  return strings, np.array([float(s) for s in strings])


def _freeze(value):
  """Makes every array inside `value` read-only: cached worlds are shared by all callers."""
  if isinstance(value, np.ndarray):
    value.setflags(write=False)
  elif isinstance(value, dict):
    for item in value.values():
      _freeze(item)
  elif isinstance(value, (tuple, list)):
    for item in value:
      _freeze(item)
  elif dataclasses.is_dataclass(value) and not isinstance(value, type):
    for field in dataclasses.fields(value):
      _freeze(getattr(value, field.name))
  return value


# ------------------------------------------------------------------------------------------------
# The ELM world: entities, latent factors, user pools, and every token the files can hold.


@dataclasses.dataclass(frozen=True)
class _ElmText:
  buffer: np.ndarray
  ints: _Tokens                       # value v at index v - _INT_LO
  comma: int
  newline: int
  user: Dict[str, _Tokens]            # scalar columns that depend on the user only
  item: Dict[str, _Tokens]            # scalar columns that depend on the candidate item only
  time_type: _Tokens                  # fs.ELM_TIME_TYPES
  lists: Dict[str, np.ndarray]        # list column -> [users, max_history + 1] positions


@dataclasses.dataclass(frozen=True)
class ElmWorld:
  """Everything fixed by (PlantedModel, seed): what the rows are drawn from and scored by."""
  planted: PlantedModel
  seed: int
  intercept: float
  user_cdf: np.ndarray
  item_cdf: np.ndarray
  item_shop: np.ndarray
  item_category: np.ndarray
  item_brand: np.ndarray              # -1: no brand
  item_price: np.ndarray              # as parsed back from the written string
  item_rank_7: np.ndarray
  user_gender: np.ndarray             # 1, 2, or -99 (missing: the reader's default)
  user_is_supervip: np.ndarray
  user_avg_price: np.ndarray          # as parsed back from the written string
  user_bias: np.ndarray
  item_bias: np.ndarray
  shop_bias: np.ndarray
  category_bias: np.ndarray
  brand_bias: np.ndarray              # last entry 0.0 serves brand -1
  user_factors: np.ndarray
  item_factors: np.ndarray
  category_factors: np.ndarray
  history_pool: np.ndarray            # [users, max_history] item of each past event
  user_ids: Tuple[str, ...]
  item_ids: Tuple[str, ...]
  text: _ElmText

  def logits(self, inputs: Dict[str, np.ndarray]) -> np.ndarray:
    """True logits from the columns that matter (see `read_inputs` for the keys)."""
    m = self.planted
    user, item = inputs['user'], inputs['item']
    category, shop = self.item_category[item], self.item_shop[item]
    linear = (self.user_bias[user] + self.item_bias[item] + self.shop_bias[shop]
              + self.category_bias[category] + self.brand_bias[self.item_brand[item]])
    avg_price = np.maximum(inputs['avg_price'], 0.01)  # the reader's default is 0.0
    linear = linear - _PRICE_FIT * np.abs(np.log(self.item_price[item] / avg_price))
    linear = linear + _HOUR_EFFECT[inputs['hours']]
    linear = linear - _RANK_EFFECT * np.log(np.maximum(inputs['rank_7'], 1))
    linear = linear + _SUPERVIP_EFFECT * inputs['is_supervip']
    linear = linear + _GENDER_2_EFFECT * (inputs['gender'] == 2)

    taste = self.item_factors[item] + self.category_factors[category]
    pairwise = _rowwise_dot(self.user_factors[user], taste) / np.sqrt(2 + 2 * _ITEM_CATEGORY_RHO)

    history = inputs['history']
    valid = history >= 0
    past = np.where(valid, history, 0)
    same_item = (past == item[:, None]) & valid
    same_shop = (self.item_shop[past] == shop[:, None]) & valid
    same_category = (self.item_category[past] == category[:, None]) & valid
    matches = (_HISTORY_ITEM * same_item.sum(1) + _HISTORY_SHOP * same_shop.sum(1)
               + _HISTORY_CATEGORY * same_category.sum(1))
    history_term = matches / np.maximum(valid.sum(1), 1)

    return (self.intercept + m.linear_weight * linear + m.interaction_weight * pairwise
            + m.history_weight * history_term)

  def draw(self, rng: np.random.Generator, n: int) -> Dict[str, np.ndarray]:
    """n rows: the `logits` inputs plus what only the text needs."""
    m = self.planted
    width = m.max_history
    user = _sample_cdf(rng, self.user_cdf, n)
    from_pool = rng.random(n) < m.repeat_rate
    pool_item = self.history_pool[user, rng.integers(0, width, n)]
    item = np.where(from_pool, pool_item, _sample_cdf(rng, self.item_cdf, n))
    nonempty = rng.random(n) >= m.empty_history_rate
    mean_nonempty = m.mean_history / (1.0 - m.empty_history_rate)
    length = np.where(nonempty, np.minimum(rng.geometric(1.0 / mean_nonempty, n), width), 0)
    offset = (rng.random(n) * (width - length + 1)).astype(np.int64)
    slots = np.arange(width)
    history = self.history_pool[user[:, None], np.minimum(offset[:, None] + slots, width - 1)]
    history = np.where(slots < length[:, None], history, -1)
    return dict(
        user=user, item=item, history=history,
        hours=_sample_cdf(rng, _HOUR_CDF, n),
        gender=self.user_gender[user], is_supervip=self.user_is_supervip[user],
        avg_price=self.user_avg_price[user], rank_7=self.item_rank_7[item],
        history_offset=offset, history_length=length,
        weekdays=rng.integers(0, 7, n), times=1 + rng.poisson(1.5, n))

  def encode(self, rows: Dict[str, np.ndarray], labels: np.ndarray) -> bytes:
    """The CSV lines of drawn rows, in fs.ELM_COLUMNS order."""
    text = self.text
    ints = lambda values: text.ints[np.asarray(values) - _INT_LO]
    user, item = rows['user'], rows['item']
    fields = {'clicked': ints(labels), 'times': ints(rows['times']),
              'hours': ints(rows['hours']), 'weekdays': ints(rows['weekdays']),
              'time_type': text.time_type[_HOUR_TIME_TYPE[rows['hours']]]}
    fields.update({name: tokens[user] for name, tokens in text.user.items()})
    fields.update({name: tokens[item] for name, tokens in text.item.items()})
    offset, length = rows['history_offset'], rows['history_length']
    for name, positions in text.lists.items():
      start = positions[user, offset]
      end = positions[user, offset + length] - 1
      fields[name] = _Tokens(start, np.where(length > 0, end - start, 0))
    return _join_rows(text.buffer, [fields[c.name] for c in fs.ELM_COLUMNS], text.comma,
                      text.newline)

  def read_inputs(self, lines: Sequence[str]) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Labels and `logits` inputs parsed back from ELM lines (fields empty -> defaults)."""
    index = {c.name: k for k, c in enumerate(fs.ELM_COLUMNS)}
    user_of = {s: k for k, s in enumerate(self.user_ids)}
    item_of = {s: k for k, s in enumerate(self.item_ids)}
    rows = [line.rstrip('\n').split(',') for line in lines]
    col = lambda name: [r[index[name]] for r in rows]
    as_int = lambda name, default: np.array([int(v) if v else default for v in col(name)])
    history = np.full((len(rows), self.planted.max_history), -1, np.int64)
    for r, value in enumerate(col('item_id_list')):
      past = [item_of[s] for s in value.split(';')] if value else []
      history[r, :len(past)] = past
    inputs = dict(
        user=np.array([user_of[s] for s in col('user_id')]),
        item=np.array([item_of[s] for s in col('item_id')]),
        history=history, hours=as_int('hours', 0), gender=as_int('gender', -99),
        is_supervip=as_int('is_supervip', 0), rank_7=as_int('rank_7', 0),
        avg_price=np.array([float(v) if v else 0.0 for v in col('avg_price')]))
    return as_int('clicked', 0), inputs


def _elm_catalogue(m: PlantedModel, rng: np.random.Generator) -> Dict[str, Any]:
  """Cities > districts > shops (AOI, geohash, brand) > items (food, category, price, rank)."""
  city_probs = _zipf_probs(m.num_cities, 1.0)
  district_city = np.concatenate(
      [np.arange(m.num_cities), _sample(rng, city_probs, m.num_districts - m.num_cities)])
  shop_city = _sample(rng, city_probs, m.num_shops)
  shop_district = _pick_member(rng, shop_city, district_city, m.num_cities)
  aoi_district = rng.integers(0, m.num_districts, m.num_aois)
  shop_aoi = _pick_member(rng, shop_district, aoi_district, m.num_districts)
  shop_aoi = np.where(rng.random(m.num_shops) < _NO_AOI_RATE, -1, shop_aoi)
  shop_brand = np.where(rng.random(m.num_shops) < _NO_BRAND_RATE, -1,
                        _sample(rng, _zipf_probs(m.num_brands, 1.0), m.num_shops))
  # Geohash cells nest like the places: a city's 4 characters, a district's 5th, a shop's 6th.
  city_cell = _random_strings(rng, np.full(m.num_cities, b'w'), 3)
  district_cell = _random_strings(rng, city_cell[district_city], 1)
  shop_geohash6 = _random_strings(rng, district_cell[shop_district], 1)

  food_category = _sample(rng, _zipf_probs(m.num_categories, 1.0), m.num_foods)
  item_food = _sample(rng, _zipf_probs(m.num_foods, 1.0), m.num_items)
  item_category = food_category[item_food]
  item_shop = _sample(rng, _zipf_probs(m.num_shops, 0.8), m.num_items)
  category_price = 20.0 * np.exp(rng.normal(0.0, 0.35, m.num_categories))
  raw_price = category_price[item_category] * np.exp(rng.normal(0.0, 0.25, m.num_items))
  price_strings, item_price = _floats_as_written(
      np.maximum(np.round(raw_price * 2.0) / 2.0, 1.0), '%.1f')

  item_probs = _zipf_probs(m.num_items, m.item_zipf)[rng.permutation(m.num_items)]
  popularity_rank = np.empty(m.num_items, np.int64)
  popularity_rank[np.argsort(-item_probs, kind='stable')] = np.arange(1, m.num_items + 1)
  rank_7, rank_30, rank_90 = (
      np.clip(np.round(popularity_rank * np.exp(rng.normal(0.0, noise, m.num_items))),
              1, _INT_HI - 1).astype(np.int64) for noise in (0.3, 0.2, 0.1))
  return dict(shop_city=shop_city, shop_district=shop_district, shop_aoi=shop_aoi,
              shop_brand=shop_brand, shop_geohash6=shop_geohash6,
              shop_geohash12=_random_strings(rng, shop_geohash6, 6),
              item_food=item_food, item_category=item_category, item_shop=item_shop,
              item_brand=shop_brand[item_shop], item_price=item_price,
              price_strings=price_strings, item_probs=item_probs, rank_7=rank_7,
              rank_30=rank_30, rank_90=rank_90)


def _sample_pools(rng: np.random.Generator, m: PlantedModel, user_factors: np.ndarray,
                  item_factors: np.ndarray, item_cdf: np.ndarray, item_log_price: np.ndarray,
                  user_log_price: np.ndarray) -> np.ndarray:
  """Each user's past items: a popularity-drawn consideration set, resampled by taste and price.

  Scoring a consideration set instead of every item keeps the build linear in the users.
  """
  users = user_factors.shape[0]
  pools = np.empty((users, m.max_history), np.int64)
  block = 2048
  for lo in range(0, users, block):
    hi = min(users, lo + block)
    considered = _sample_cdf(rng, item_cdf, (hi - lo, _CONSIDERATION_SET))
    taste = np.einsum('ud,ukd->uk', user_factors[lo:hi], item_factors[considered])
    misfit = np.abs(item_log_price[considered] - user_log_price[lo:hi, None])
    logw = m.history_sharpness * taste - _HISTORY_PRICE_SHARPNESS * misfit
    cdf = np.cumsum(np.exp(logw - logw.max(1, keepdims=True)), axis=1)
    cdf /= cdf[:, -1:]
    # One searchsorted for the whole block: row r's CDF is shifted into [r, r + 1].
    shift = np.arange(hi - lo)[:, None]
    found = np.searchsorted((cdf + shift).reshape(-1),
                            (rng.random((hi - lo, m.max_history)) + shift).reshape(-1),
                            side='right').reshape(hi - lo, m.max_history)
    found = np.clip(found - shift * _CONSIDERATION_SET, 0, _CONSIDERATION_SET - 1)
    pools[lo:hi] = np.take_along_axis(considered, found, axis=1)
  return pools


def _elm_users(m: PlantedModel, rng: np.random.Generator, cat: Dict[str, Any],
               user_factors: np.ndarray, item_factors: np.ndarray,
               user_bias: np.ndarray) -> Dict[str, Any]:
  """Each user's history pool and the user columns, derived from the pool and the user's bias."""
  user_log_price = np.log(20.0) + rng.normal(0.0, 0.3, m.num_users)
  pools = _sample_pools(rng, m, user_factors, item_factors, _cdf(cat['item_probs']),
                        np.log(cat['item_price']), user_log_price)
  gender = np.where(rng.random(m.num_users) < 0.45, 1, 2)
  gender = np.where(rng.random(m.num_users) < m.missing_gender_rate, -99, gender)
  avg_strings, avg_price = _floats_as_written(
      cat['item_price'][pools].mean(1) * np.exp(rng.normal(0.0, 0.05, m.num_users)), '%.2f')
  ctr_30 = np.minimum(rng.poisson(3.0 * np.exp(2.0 * user_bias)), _INT_HI - 1)
  ord_30 = np.minimum(rng.poisson(1.0 + 0.3 * ctr_30), _INT_HI - 1)
  amount_strings, _ = _floats_as_written(
      ord_30 * avg_price * np.exp(rng.normal(0.0, 0.15, m.num_users)), '%.2f')
  # Users live near the shop of their first past order.
  home_shop = cat['item_shop'][pools[:, 0]]
  return dict(
      pools=pools, gender=gender,
      is_supervip=(rng.random(m.num_users) < _SUPERVIP_RATE).astype(np.int64),
      avg_strings=avg_strings, avg_price=avg_price, ctr_30=ctr_30, ord_30=ord_30,
      amount_strings=amount_strings, city=cat['shop_city'][home_shop],
      geohash12=_random_strings(rng, cat['shop_geohash6'][home_shop], 6),
      event_hours=_sample_cdf(rng, _HOUR_CDF, pools.shape),
      event_weekdays=rng.integers(0, 7, pools.shape),
      event_timediff=np.minimum(np.cumsum(1 + rng.geometric(1.0 / 36.0, pools.shape), 1),
                                _INT_HI - 1))


def _elm_ids(m: PlantedModel, rng: np.random.Generator) -> Dict[str, List[str]]:
  """Decimal id strings per entity, with digit counts like the real data's."""
  digits = dict(user=(m.num_users, 8), item=(m.num_items, 9), shop=(m.num_shops, 7),
                category=(m.num_categories, 3), food=(m.num_foods, 6),
                brand=(m.num_brands, 6), city=(m.num_cities, 3),
                district=(m.num_districts, 4), aoi=(m.num_aois, 6))
  return {name: _unique_ids(rng, n, d) for name, (n, d) in digits.items()}


def _elm_text(cat: Dict[str, Any], users: Dict[str, Any], ids: Dict[str, List[str]]) -> _ElmText:
  """Every token once, then each user's twelve history lists joined once."""
  pool = _TokenPool()
  comma, semicolon, newline = (int(pool.add([c]).start[0]) for c in (',', ';', '\n'))
  ints = pool.add([str(v) for v in range(_INT_LO, _INT_HI)])
  int_tokens = lambda values: ints[np.asarray(values) - _INT_LO]
  decoded = lambda values: [v.decode() for v in values]
  shop = pool.add(ids['shop'])
  item = pool.add(ids['item'])
  category = pool.add(ids['category'])
  food = pool.add(ids['food'])
  brand = pool.add(ids['brand'] + [''])          # the scalar is empty when a shop has no brand
  brand_in_list = pool.add(ids['brand'] + ['0'])  # what an empty scalar reads as
  aoi = pool.add(ids['aoi'] + [''])
  city = pool.add(ids['city'])
  district = pool.add(ids['district'])
  geohash6 = pool.add(decoded(cat['shop_geohash6']))
  geohash12 = pool.add(decoded(cat['shop_geohash12']))
  price = pool.add(cat['price_strings'])
  time_type = pool.add(list(fs.ELM_TIME_TYPES))
  gender = int_tokens(np.maximum(users['gender'], 0))

  item_shop = cat['item_shop']
  user_columns = {
      'user_id': pool.add(ids['user']),
      'gender': _Tokens(gender.start, np.where(users['gender'] < 0, 0, gender.length)),
      'visit_city': city[users['city']], 'avg_price': pool.add(users['avg_strings']),
      'is_supervip': int_tokens(users['is_supervip']), 'ctr_30': int_tokens(users['ctr_30']),
      'ord_30': int_tokens(users['ord_30']), 'total_amt_30': pool.add(users['amount_strings']),
      'geohash12': pool.add(decoded(users['geohash12']))}
  item_columns = {
      'shop_id': shop[item_shop], 'item_id': item,
      'city_id': city[cat['shop_city'][item_shop]],
      'district_id': district[cat['shop_district'][item_shop]],
      'shop_aoi_id': aoi[cat['shop_aoi'][item_shop]],
      'shop_geohash_6': geohash6[item_shop], 'shop_geohash_12': geohash12[item_shop],
      'brand_id': brand[cat['item_brand']], 'category_1_id': category[cat['item_category']],
      'merge_standard_food_id': food[cat['item_food']], 'rank_7': int_tokens(cat['rank_7']),
      'rank_30': int_tokens(cat['rank_30']), 'rank_90': int_tokens(cat['rank_90'])}
  pools = users['pools']
  event_columns = {
      'shop_id_list': shop[item_shop[pools]], 'item_id_list': item[pools],
      'category_1_id_list': category[cat['item_category'][pools]],
      'merge_standard_food_id_list': food[cat['item_food'][pools]],
      'brand_id_list': brand_in_list[cat['item_brand'][pools]], 'price_list': price[pools],
      'shop_aoi_id_list': aoi[cat['shop_aoi'][item_shop[pools]]],
      'shop_geohash6_list': geohash6[item_shop[pools]],
      'timediff_list': int_tokens(users['event_timediff']),
      'hours_list': int_tokens(users['event_hours']),
      'time_type_list': time_type[_HOUR_TIME_TYPE[users['event_hours']]],
      'weekdays_list': int_tokens(users['event_weekdays'])}
  source = pool.array()
  lists = {name: _list_positions(pool, source, tokens, semicolon)
           for name, tokens in event_columns.items()}
  return _ElmText(buffer=pool.array(), ints=ints, comma=comma, newline=newline,
                  user=user_columns, item=item_columns, time_type=time_type, lists=lists)


def _build_elm_world(m: PlantedModel, seed: int) -> ElmWorld:
  rng = _rng(seed, _WORLD_STREAM)
  cat = _elm_catalogue(m, rng)
  user_probs = _zipf_probs(m.num_users, m.user_zipf)[rng.permutation(m.num_users)]
  d, rho = m.latent_dim, _ITEM_CATEGORY_RHO
  category_factors = rng.normal(0.0, 1.0, (m.num_categories, d))
  item_factors = (rho * category_factors[cat['item_category']]
                  + np.sqrt(1 - rho**2) * rng.normal(0.0, 1.0, (m.num_items, d)))
  user_factors = rng.normal(0.0, 1.0 / np.sqrt(d), (m.num_users, d))
  user_bias = rng.normal(0.0, _USER_BIAS_STD, m.num_users)
  biases = dict(item_bias=rng.normal(0.0, _ITEM_BIAS_STD, m.num_items),
                shop_bias=rng.normal(0.0, _SHOP_BIAS_STD, m.num_shops),
                category_bias=rng.normal(0.0, _CATEGORY_BIAS_STD, m.num_categories),
                brand_bias=np.append(rng.normal(0.0, _BRAND_BIAS_STD, m.num_brands), 0.0))
  users = _elm_users(m, rng, cat, user_factors, item_factors, user_bias)
  ids = _elm_ids(m, rng)
  return ElmWorld(
      planted=m, seed=seed, intercept=0.0, user_cdf=_cdf(user_probs),
      item_cdf=_cdf(cat['item_probs']), item_shop=cat['item_shop'],
      item_category=cat['item_category'], item_brand=cat['item_brand'],
      item_price=cat['item_price'], item_rank_7=cat['rank_7'], user_gender=users['gender'],
      user_is_supervip=users['is_supervip'], user_avg_price=users['avg_price'],
      user_bias=user_bias, user_factors=user_factors, item_factors=item_factors,
      category_factors=category_factors, history_pool=users['pools'],
      user_ids=tuple(ids['user']), item_ids=tuple(ids['item']),
      text=_elm_text(cat, users, ids), **biases)


# ------------------------------------------------------------------------------------------------
# The Criteo world.


@dataclasses.dataclass(frozen=True)
class _CriteoText:
  buffer: np.ndarray
  ints: _Tokens
  tab: int
  newline: int
  categorical: Tuple[_Tokens, ...]    # per column; the last token ('') serves a missing id


@dataclasses.dataclass(frozen=True)
class CriteoWorld:
  """Everything fixed by (CriteoPlantedModel, seed)."""
  planted: CriteoPlantedModel
  seed: int
  intercept: float
  cdfs: Tuple[np.ndarray, ...]
  biases: Tuple[np.ndarray, ...]      # per column, last entry 0.0 serves a missing id
  factors: Dict[int, np.ndarray]      # column -> [vocab + 1, d], last row 0 (missing)
  hex_ids: Tuple[Tuple[str, ...], ...]
  text: _CriteoText

  def logits(self, inputs: Dict[str, np.ndarray]) -> np.ndarray:
    """True logits from 'categorical' [n, 26] (-1: missing) and 'dense' [n, 13] (missing: 0)."""
    m = self.planted
    ids, dense = inputs['categorical'], inputs['dense']
    linear = np.zeros(ids.shape[0])
    for c, bias in enumerate(self.biases):
      linear = linear + bias[ids[:, c]]
    scaled = np.log1p(np.maximum(dense, 0)) / _CRITEO_DENSE[:, 1]
    for j in range(dense.shape[1]):
      linear = linear + _CRITEO_DENSE[j, 3] * scaled[:, j]
    pairwise = np.zeros(ids.shape[0])
    for a, b in m.interaction_pairs:
      pairwise = pairwise + _rowwise_dot(self.factors[a][ids[:, a]], self.factors[b][ids[:, b]])
    if m.interaction_pairs:
      pairwise = pairwise / np.sqrt(len(m.interaction_pairs))
    return self.intercept + m.linear_weight * linear + m.interaction_weight * pairwise

  def draw(self, rng: np.random.Generator, n: int) -> Dict[str, np.ndarray]:
    """n rows: the `logits` inputs plus which dense fields are written empty."""
    m = self.planted
    ids = np.stack([_sample_cdf(rng, cdf, n) for cdf in self.cdfs], axis=1)
    ids = np.where(rng.random(ids.shape) < np.asarray(m.missing_rates), -1, ids)
    mu, sigma, missing_rate = (_CRITEO_DENSE[:, k] for k in range(3))
    counts = np.floor(np.exp(mu + sigma * rng.normal(size=(n, mu.size))))
    counts = np.minimum(counts, _INT_HI - 1).astype(np.int64)
    negative = rng.random(n) < _CRITEO_NEGATIVE_I2_RATE
    counts[:, 1] = np.where(negative, -rng.integers(1, 4, n), counts[:, 1])
    missing = rng.random(counts.shape) < missing_rate
    # A missing count is read as the column default 0, which is what the logit sees too.
    return dict(categorical=ids, dense=np.where(missing, 0, counts), dense_missing=missing)

  def encode(self, rows: Dict[str, np.ndarray], labels: np.ndarray) -> bytes:
    """The tab-separated lines of drawn rows: label, I1..I13, C1..C26."""
    text = self.text
    fields = [text.ints[labels - _INT_LO]]
    for j in range(fs.CRITEO_NUM_DENSE):
      tokens = text.ints[rows['dense'][:, j] - _INT_LO]
      fields.append(_Tokens(tokens.start, np.where(rows['dense_missing'][:, j], 0,
                                                    tokens.length)))
    fields += [text.categorical[c][rows['categorical'][:, c]]
               for c in range(fs.CRITEO_NUM_SPARSE)]
    return _join_rows(text.buffer, fields, text.tab, text.newline)

  def read_inputs(self, lines: Sequence[str]) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Labels and `logits` inputs parsed back from Criteo lines."""
    maps = [{s: k for k, s in enumerate(column)} for column in self.hex_ids]
    rows = [line.rstrip('\n').split('\t') for line in lines]
    labels = np.array([int(r[0]) for r in rows])
    dense = np.array([[int(v) if v else 0 for v in r[1:1 + fs.CRITEO_NUM_DENSE]] for r in rows])
    ids = np.array([[maps[c][v] if v else -1
                     for c, v in enumerate(r[1 + fs.CRITEO_NUM_DENSE:])] for r in rows])
    return labels, dict(categorical=ids.reshape(len(rows), fs.CRITEO_NUM_SPARSE),
                        dense=dense.reshape(len(rows), fs.CRITEO_NUM_DENSE))


def _build_criteo_world(m: CriteoPlantedModel, seed: int) -> CriteoWorld:
  rng = _rng(seed, _WORLD_STREAM)
  cdfs, biases, hex_ids = [], [], []
  for size in m.vocab_sizes:
    cdfs.append(_cdf(_zipf_probs(size, m.zipf)[rng.permutation(size)]))
    biases.append(np.append(rng.normal(0.0, _CRITEO_BIAS_STD, size), 0.0))
    hex_ids.append(tuple(f'{x:08x}' for x in rng.choice(1 << 32, size=size, replace=False)))
  scale = m.latent_dim**-0.25  # unit variance of each product of two factors
  factors = {}
  for c in sorted({c for pair in m.interaction_pairs for c in pair}):
    table = rng.normal(0.0, scale, (m.vocab_sizes[c], m.latent_dim))
    factors[c] = np.concatenate([table, np.zeros((1, m.latent_dim))])
  pool = _TokenPool()
  tab, newline = (int(pool.add([c]).start[0]) for c in ('\t', '\n'))
  ints = pool.add([str(v) for v in range(_INT_LO, _INT_HI)])
  categorical = tuple(pool.add(list(column) + ['']) for column in hex_ids)
  text = _CriteoText(buffer=pool.array(), ints=ints, tab=tab, newline=newline,
                     categorical=categorical)
  return CriteoWorld(planted=m, seed=seed, intercept=0.0, cdfs=tuple(cdfs), biases=tuple(biases),
                     factors=factors, hex_ids=tuple(hex_ids), text=text)


# ------------------------------------------------------------------------------------------------
# Worlds, files and the oracle.

World = Union[ElmWorld, CriteoWorld]


@functools.lru_cache(maxsize=2)
def _cached_world(kind: str, planted: Planted, seed: int) -> World:
  build = _build_elm_world if kind == 'elm' else _build_criteo_world
  world = build(planted, seed)
  # The intercept is fitted on rows of its own stream, so it does not depend on the row counts.
  rows = world.draw(_rng(seed, _CALIBRATION_STREAM), _CALIBRATION_ROWS)
  intercept = _solve_intercept(world.logits(rows), planted.target_ctr)
  return _freeze(dataclasses.replace(world, intercept=intercept))


def build_world(kind: str, planted: Union[Planted, Dict[str, Any], None] = None,
                seed: int = 0) -> World:
  """The world of `kind` for (planted, seed), intercept solved; cached, arrays read-only."""
  if int(seed) < 0:
    raise ValueError(f'seed={seed} must be non-negative')
  return _cached_world(kind, planted_model(kind, planted), int(seed))


def _split_stats(labels: np.ndarray, probs: np.ndarray) -> Dict[str, float]:
  ctr = float(labels.mean()) if labels.size else float('nan')
  return dict(rows=int(labels.size), ctr=ctr, mean_probability=float(probs.mean()),
              oracle_auc=metrics.exact_auc(labels, probs),
              oracle_logloss=metrics.logloss(labels, probs),
              constant_logloss=metrics.logloss(labels, np.full(labels.size, ctr)))


def _write_split(world: World, path: str, split: int, rows: int, use_gzip: bool):
  """Writes `rows` rows to `path` (atomically); returns their labels and true probabilities."""
  labels = np.empty(rows, np.int64)
  probs = np.empty(rows, np.float64)
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with open(temporary, 'wb') as raw:
      # mtime=0 and no file name keep gzip output byte-identical across runs.
      out = gzip.GzipFile(filename='', mode='wb', fileobj=raw, mtime=0,
                          compresslevel=1) if use_gzip else raw
      # One writer thread: the disk write (and gzip's zlib) of a chunk overlaps the next draw.
      with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for chunk, lo in enumerate(range(0, rows, CHUNK_ROWS)):
          n = min(CHUNK_ROWS, rows - lo)
          rng = _rng(world.seed, _ROWS_STREAM, split, chunk)
          drawn = world.draw(rng, n)
          p = _sigmoid(world.logits(drawn))
          y = (rng.random(n) < p).astype(np.int64)
          text = world.encode(drawn, y)
          labels[lo:lo + n], probs[lo:lo + n] = y, p
          if pending is not None:
            pending.result()
          pending = writer.submit(out.write, text)
        if pending is not None:
          pending.result()
      if use_gzip:
        out.close()
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return labels, probs


def _file_names(kind: str, use_gzip: bool) -> Tuple[str, str]:
  return tuple(name + ('.gz' if use_gzip else '') for name in FILE_NAMES[kind])


def recorded_parameters(kind, train_rows, eval_rows, seed, use_gzip, planted) -> Dict[str, Any]:
  """What decides a planted data set's rows, as oracle.json records it."""
  params = dict(generator_version=GENERATOR_VERSION, kind=kind, seed=int(seed),
                train_rows=int(train_rows), eval_rows=int(eval_rows), gzip=bool(use_gzip),
                planted=dataclasses.asdict(planted))
  return json.loads(json.dumps(params))  # tuples -> lists, as they read back from oracle.json


def _all_file_names(kind: str) -> List[str]:
  return [name for gz in (False, True) for name in _file_names(kind, gz)]


def _planted_names(out_dir: str) -> Optional[List[str]]:
  """The data files datagen wrote in out_dir, from its marker (or oracle.json); None: no record.

  An empty marker (written by releases that did not list the names) vouches for every data file
  name, as those releases took it to.
  """
  try:
    with open(os.path.join(out_dir, PLANTED_MARKER)) as f:
      text = f.read().strip()
  except FileNotFoundError:
    oracle = read_oracle(out_dir)
    return list(oracle.get('files', {}).values()) if oracle else None
  if not text:
    return [n for kind in FILE_NAMES for n in _all_file_names(kind)]
  return json.loads(text)


def _claim_file_names(out_dir: str, kind: str) -> None:
  """Records in out_dir's marker that datagen is about to write `kind`'s data files there.

  generate() rewrites (or removes) them: refuses when one that exists was not written by datagen
  (someone's real data: a data_location holding train.csv, say, or real Criteo files in a
  directory of planted ELM data).
  """
  names = _all_file_names(kind)
  recorded = _planted_names(out_dir) or []
  foreign = [n for n in names if n not in recorded and os.path.exists(os.path.join(out_dir, n))]
  oracle = read_oracle(out_dir)
  if (os.path.exists(os.path.join(out_dir, ORACLE_FILE))
      and not (oracle and oracle.get('kind') in FILE_NAMES)):
    foreign.append(ORACLE_FILE)  # someone's own notes by that name, removed before generating
  if foreign:
    raise FileExistsError(
        f'{out_dir} holds {", ".join(foreign)}, not written by datagen (not listed in its '
        f'{PLANTED_MARKER}): refusing to overwrite them; choose another out_dir')
  metrics.write_json_atomic(os.path.join(out_dir, PLANTED_MARKER),
                            sorted(set(recorded) | set(names)))


def generate(kind: str, out_dir: str, train_rows: int, eval_rows: int, seed: int,
             planted: Union[Planted, Dict[str, Any], None] = None,
             gzip_files: bool = False) -> Dict[str, Any]:
  """Writes train/eval files of `kind` and then oracle.json; returns the oracle dict."""
  if train_rows < 1 or eval_rows < 1:
    raise ValueError('train_rows and eval_rows must be positive')
  planted = planted_model(kind, planted)
  started = time.perf_counter()
  world = build_world(kind, planted, seed)  # a bad seed or model fails before anything is written
  built = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  _claim_file_names(out_dir, kind)
  oracle_path = os.path.join(out_dir, ORACLE_FILE)
  names = _file_names(kind, gzip_files)
  # An old oracle.json could describe the new files if this run is interrupted; the other
  # compression's files would be read instead of the new ones (the reader prefers plain names).
  for name in (ORACLE_FILE, *_file_names(kind, not gzip_files)):
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  oracle = recorded_parameters(kind, train_rows, eval_rows, seed, gzip_files, planted)
  oracle['intercept'] = world.intercept
  oracle['files'] = dict(zip(('train', 'eval'), names))
  oracle['file_bytes'] = {}
  for split, (name, rows) in enumerate(zip(('train', 'eval'), (train_rows, eval_rows))):
    path = os.path.join(out_dir, oracle['files'][name])
    labels, probs = _write_split(world, path, split, rows, gzip_files)
    oracle['file_bytes'][name] = os.path.getsize(path)
    if name == 'eval':  # the rows the oracle figures score: an edit that keeps the size shows
      oracle['eval_file_sha256'] = _sha256(path)
    for key, value in _split_stats(labels, probs).items():
      oracle[f'{name}_{key}'] = value
  oracle['oracle_auc'] = oracle['eval_oracle_auc']
  oracle['oracle_logloss'] = oracle['eval_oracle_logloss']
  seconds = time.perf_counter() - built
  logging.info('planted %s data: %d rows in %.1f s (%.0f rows/s; world %.1f s) -> %s', kind,
               train_rows + eval_rows, seconds, (train_rows + eval_rows) / max(seconds, 1e-9),
               built - started, out_dir)
  oracle = metrics.json_ready(oracle)  # as read back when reused: an undefined AUC is None
  metrics.write_json_atomic(oracle_path, oracle)
  return _with_paths(oracle, out_dir, reused=False)


def generate_elm(out_dir: str, train_rows: int, eval_rows: int, seed: int,
                 planted: Union[PlantedModel, Dict[str, Any], None] = None,
                 gzip_files: bool = False) -> Dict[str, Any]:
  """ELM train.csv / eval.csv and oracle.json under out_dir; returns the oracle dict."""
  return generate('elm', out_dir, train_rows, eval_rows, seed, planted, gzip_files)


def generate_criteo(out_dir: str, train_rows: int, eval_rows: int, seed: int,
                    planted: Union[CriteoPlantedModel, Dict[str, Any], None] = None,
                    gzip_files: bool = False) -> Dict[str, Any]:
  """Criteo train.txt / eval.txt and oracle.json under out_dir; returns the oracle dict."""
  return generate('criteo', out_dir, train_rows, eval_rows, seed, planted, gzip_files)


def _with_paths(oracle: Dict[str, Any], out_dir: str, reused: bool) -> Dict[str, Any]:
  result = dict(oracle)
  result['train_path'] = os.path.join(out_dir, oracle['files']['train'])
  result['eval_path'] = os.path.join(out_dir, oracle['files']['eval'])
  result['reused'] = reused
  return result


def read_oracle(out_dir: str) -> Optional[Dict[str, Any]]:
  """oracle.json of a complete data set under out_dir, or None."""
  try:
    with open(os.path.join(out_dir, ORACLE_FILE)) as f:
      oracle = json.load(f)
  except (OSError, ValueError):
    return None
  return oracle if isinstance(oracle, dict) else None


def read_complete(out_dir: str, kind: str) -> Optional[Dict[str, Any]]:
  """The oracle dict (with 'train_path' and 'eval_path') of a complete planted data set of
  `kind` in out_dir, its files as oracle.json recorded them; None if there is none."""
  oracle = read_oracle(out_dir)
  if oracle is None or oracle.get('kind') != kind or not _is_complete(oracle, out_dir):
    return None
  return _with_paths(oracle, out_dir, reused=True)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(functools.partial(f.read, 1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _is_complete(oracle: Dict[str, Any], out_dir: str) -> bool:
  """Whether out_dir's files are the ones oracle.json describes: their sizes, and the eval
  file's bytes (a flipped label keeps the size). Data sets written before the eval file's
  digest was recorded are checked by size alone."""
  try:
    if not all(os.path.getsize(os.path.join(out_dir, oracle['files'][split])) ==
               oracle['file_bytes'][split] for split in ('train', 'eval')):
      return False
    digest = oracle.get('eval_file_sha256')
    return digest is None or _sha256(os.path.join(out_dir, oracle['files']['eval'])) == digest
  except (OSError, KeyError, TypeError):
    return False


def ensure_planted_data(out_dir: str, kind: str, train_rows: int, eval_rows: int, seed: int,
                        gzip_files: bool = False,
                        planted: Union[Planted, Dict[str, Any], None] = None,
                        force: bool = False, **planted_fields) -> Dict[str, Any]:
  """The planted data set under out_dir: reused when complete and identical (unless `force`),
  else generated.

  Args:
    out_dir: directory of the files and oracle.json.
    kind: 'elm' or 'criteo'.
    train_rows, eval_rows, seed: the data set's size and seed.
    gzip_files: write `.gz` files (the trainer reads both; gzip is what Criteo's files come as).
    planted: a planted model (or dict of its fields); defaults when None.
    **planted_fields: overrides of the planted model's fields, e.g. interaction_weight=0.0.

  Returns:
    The oracle dict (oracle.json) plus 'train_path', 'eval_path' and 'reused'.
  """
  oracle, held = ensure_and_hold(out_dir, kind, train_rows, eval_rows, seed, gzip_files, planted,
                                 force, **planted_fields)
  if held is not None:
    held.close()
  return oracle


def ensure_and_hold(out_dir: str, kind: str, train_rows: int, eval_rows: int, seed: int,
                    gzip_files: bool = False,
                    planted: Union[Planted, Dict[str, Any], None] = None,
                    force: bool = False,
                    **planted_fields) -> Tuple[Dict[str, Any], Optional['ReadersLock']]:
  """ensure_planted_data, and a shared lock on the data set for a run that reads it: until it is
  closed, a run asking for other data in out_dir is refused (see ReadersLock). None where the
  directory cannot hold one."""
  model = planted_model(kind, planted, **planted_fields)
  wanted = recorded_parameters(kind, train_rows, eval_rows, seed, gzip_files, model)
  with writer_lock(out_dir):
    oracle = read_oracle(out_dir)
    # No one else has a lock file made here (it is made under writer_lock), so a failure
    # removes it: a directory of someone's own files (refused below) keeps none.
    made = not os.path.exists(os.path.join(out_dir, READERS_LOCK))
    held = ReadersLock.open(out_dir)
    try:
      if (not force and oracle is not None and all(oracle.get(k) == v for k, v in wanted.items())
          and _is_complete(oracle, out_dir)):
        logging.info('reusing planted %s data in %s', kind, out_dir)
        written = _with_paths(oracle, out_dir, reused=True)
      else:
        differs = sorted(k for k, v in wanted.items() if (oracle or {}).get(k) != v)
        why = ('--force rewrites them' if force else
               f"it asks for other data ({', '.join(differs)})" if oracle and differs else
               "their files are not the ones oracle.json records (edited, or cut short)"
               if oracle else 'they are incomplete')
        if oracle and not differs and not force:
          logging.warning('planted %s data in %s: %s; writing them again', kind, out_dir, why)
        if held is not None:
          held.for_writing(why)
        written = generate(kind, out_dir, train_rows, eval_rows, seed, model, gzip_files)
      if held is not None:
        held.for_reading()
    except BaseException:
      if held is not None:
        held.close()
        if made:
          with contextlib.suppress(OSError):
            os.remove(os.path.join(out_dir, READERS_LOCK))
      raise
  return written, held


class PlantedDataInUse(RuntimeError):
  """Another run reads the planted data a run would have to rewrite."""


class ReadersLock:
  """A flock on out_dir's READERS_LOCK file: shared while a run reads the data set, exclusive
  while they are rewritten, both taken only under writer_lock.

  Runs asking for other data in one output_dir (another planted seed, say) rewrote the files
  while the first was still training: its final evaluation, which reopens the eval file, scored
  the other run's rows, beside its own oracle figures. The kernel drops the lock with the
  process, so a killed run leaves none.
  """

  def __init__(self, fd: int, out_dir: str):
    self._fd, self._out_dir = fd, out_dir

  @classmethod
  def open(cls, out_dir: str) -> Optional['ReadersLock']:
    path = os.path.join(out_dir, READERS_LOCK)
    try:
      try:
        return cls(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), out_dir)
      except OSError as e:  # another user's file, or a read-only mount: a flock needs no write
        if not (isinstance(e, PermissionError) or e.errno == errno.EROFS):
          raise
        return cls(os.open(path, os.O_RDONLY), out_dir)
    except OSError as e:  # a read-only copy of the data, say: nothing to guard there
      logging.warning('cannot open the readers lock of %s (%s): a run asking for other data '
                      'there is not stopped', out_dir, e)
      return None

  def for_writing(self, why: str) -> None:
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise PlantedDataInUse(
          f'{self._out_dir} holds planted data another run is reading (or writing, where the '
          f'directory has no lock of its own), and {why}: rewriting them would change that '
          "run's data under it. Give this run another output_dir (--config.output_dir), or run "
          'it once the other has ended.') from None
    except OSError as e:  # no flock here (NFS): unguarded, as the writer lock is
      logging.warning('cannot lock %s (%s): runs reading its data are not guarded',
                      self._out_dir, e)

  def for_reading(self) -> None:
    try:
      # Not waiting: under writer_lock no writer holds it, unless one left it held (a failed
      # writer's lock kept alive by its traceback), and waiting would hold writer_lock with it.
      fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      raise PlantedDataInUse(f'{self._out_dir}: another process is rewriting its planted data '
                             'outside of the directory lock; run this once it has ended') from None
    except OSError as e:
      logging.warning('cannot lock %s (%s): runs reading its data are not guarded',
                      self._out_dir, e)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    self.close()

  # One descriptor, one owner: a copy closed (and so released) the original's lock.
  def __copy__(self):
    return self

  def __deepcopy__(self, memo):
    return self

  def __reduce__(self):
    raise TypeError('a ReadersLock holds a flock of this process: it cannot be pickled')


@contextlib.contextmanager
def writer_lock(out_dir: str) -> Iterator[None]:
  """Holds a lock on the directory out_dir itself (flock, no lock file) while its data are
  checked and (re)written.

  Two runs started on one output_dir both found the data missing and both wrote them: the
  second rewrote the files while the first was caching them ("changed while it was being
  cached"). The second now waits, then reuses them. A directory that cannot be opened, or a file
  system without flock on directories (NFS), leaves the data unguarded. A directory made for
  the lock is removed again if the block fails before writing into it.
  """
  created = not os.path.isdir(out_dir)
  fd = _locked_directory(out_dir)
  try:
    yield
  except BaseException:
    # (ensure_and_hold removes a readers lock file it made before it gets here)
    if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
      with contextlib.suppress(OSError):  # another writer's now: this error is still the one
        os.rmdir(out_dir)
    raise
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def _locked_directory(out_dir: str) -> Optional[int]:
  """An fd of out_dir (made if missing) holding its exclusive flock; None where it cannot."""
  while True:
    try:
      os.makedirs(out_dir, exist_ok=True)
      fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
      logging.warning('cannot open %s to lock it (%s): its planted data are unguarded', out_dir, e)
      return None
    try:  # a Ctrl-C while waiting leaves no fd (and no lock) behind in the process
      locked = _flock_waiting(fd, out_dir)
      same = locked and _names_the_same(fd, out_dir)
    except BaseException:
      os.close(fd)
      raise
    if same:
      return fd
    os.close(fd)
    if not locked:
      return None
    # The holder failed and removed the directory it had made (or it was replaced): the lock
    # is on a directory no one else will open, so lock the one the name leads to now.


def _flock_waiting(fd: int, out_dir: str) -> bool:
  """Takes fd's exclusive flock, waiting for a holder; False (and a warning) where it cannot."""
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('waiting for another process writing planted data in %s', out_dir)
      fcntl.flock(fd, fcntl.LOCK_EX)
  except OSError as e:
    logging.warning('cannot lock %s (%s): another run on it at the same time could rewrite its '
                    'planted data under this one', out_dir, e)
    return False
  return True


def _names_the_same(fd: int, path: str) -> bool:
  """Whether `path` still names the directory `fd` is open on."""
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False


def _open_text(path: str):
  return gzip.open(path, 'rt') if path.endswith('.gz') else open(path)


def true_probabilities(out_dir: str, split: str = 'eval',
                       world: Optional[World] = None) -> Tuple[np.ndarray, np.ndarray]:
  """(labels, true click probabilities) of a planted file, recomputed from its text.

  The planted model and seed come from out_dir's oracle.json; pass `world` to score the file
  with another one (e.g. with resampled factors). Parses in Python: meant for checks on files of
  up to a few hundred thousand rows.
  """
  oracle = read_oracle(out_dir)
  if oracle is None:
    raise FileNotFoundError(f'no {ORACLE_FILE} in {out_dir}')
  if world is None:
    world = build_world(oracle['kind'], oracle['planted'], oracle['seed'])
  with _open_text(os.path.join(out_dir, oracle['files'][split])) as f:
    labels, inputs = world.read_inputs(f.readlines())
  return labels, _sigmoid(world.logits(inputs))


# ------------------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m dlrm_jax.datagen',
      description='Writes planted click data in the ELM or Criteo format, and its oracle.json.')
  kinds = parser.add_subparsers(dest='kind', required=True)
  for kind, cls in PLANTED_MODELS.items():
    sub = kinds.add_parser(kind, help=f'{kind} files ({", ".join(FILE_NAMES[kind])})')
    # '--out_dir=~/x' reaches us unexpanded (the shell expands '~' only at a word's start).
    sub.add_argument('--out_dir', required=True, type=os.path.expanduser)
    sub.add_argument('--train_rows', type=int, required=True)
    sub.add_argument('--eval_rows', type=int, required=True)
    sub.add_argument('--seed', type=int, default=0)
    sub.add_argument('--gzip', action='store_true', help='write .gz files')
    sub.add_argument('--force', action='store_true',
                     help='regenerate even when an identical data set is there')
    for field in dataclasses.fields(cls):
      if isinstance(field.default, (int, float)) and not isinstance(field.default, bool):
        sub.add_argument(f'--{field.name}', type=type(field.default), default=None,
                         help=f'planted model field (default {field.default})')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None):
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  cls = PLANTED_MODELS[args.kind]
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
               if getattr(args, f.name, None) is not None}
  model = planted_model(args.kind, None, **overrides)
  oracle = ensure_planted_data(args.out_dir, args.kind, args.train_rows, args.eval_rows,
                               args.seed, gzip_files=args.gzip, planted=model, force=args.force)
  summary = {k: oracle[k] for k in sorted(oracle) if k.endswith(('auc', 'logloss', 'ctr', 'rows',
                                                                  'path', 'reused'))}
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  # Here, not in main(): a notebook calling main() keeps its own log level.
  logging.set_verbosity(logging.INFO)
  main()
