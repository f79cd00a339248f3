"""Reads ELM / Criteo CSV files into fixed-shape numpy batches laid out by a `FeatureSpec`.

This is the JAX side of DeepRec's `TextLineDataset -> shuffle -> repeat -> batch -> decode_csv`
input function, with the feature columns' hashing and pooling done on the host so the model only
sees dense arrays (the layout is in `feature_spec`'s docstring):

  parse_chunk      lines -> {'label', 'dense', 'ids', 'weights'} for the rows that parse
  iter_row_chunks  files -> parsed chunks, streamed (memory independent of the file size);
                   optionally only some lines of each file (`line_ranges`)
  batches          chunks -> shuffled (optional) batches of exactly `batch_size` rows + 'mask'
  prefetch         runs any of the above in a background thread (DeepRec's `smartstaged`)
  count_rows       a fast line count, for "one epoch" step counts

A trainer does not call these directly: `data_sources` chooses between parsing every epoch and
the parsed-row cache (`row_cache`), which parses each file once with this module.

Files may be gzip'd (recognised by their first bytes, whatever their name); a damaged or cut-off
gzip stream is a DataError naming the file and the line it breaks in.

Parsing follows the reference reader (`decode_csv` in DeepRec's modelzoo `train.py`):
- Fields are split on `spec.delimiter`; every line must have exactly one field per column. An
  empty field takes the column's default string *before* anything else looks at it.
- 'int' columns accept `[ws][+-]digits[ws]` (ASCII digits, as absl::SimpleAtoi): '1.0' is an
  error, as it is for the reference. 'float' columns accept decimal numbers with an optional
  exponent. Non-finite values ('nan', 'inf', '1e999') are rejected: the reference would read them,
  but one of them turns the whole loss into NaN, so we stop with a clear error instead.
  An 'int' column fed to the model as it is (ELM's) must fit in int32, as the reference's
  decode_csv (int32 defaults) requires: a 22-digit count made the loss NaN at the first step.
  Under log(x + 1) (Criteo's) any size is read. Every dense input (after its transform) must fit
  in float32, the batch's type: a larger finite value would become inf there.
- Hashed features: FarmHash Fingerprint64 of the UTF-8 bytes, modulo the table's rows, exactly
  TensorFlow's `categorical_column_with_hash_bucket`. A scalar whose value is '' is missing (weight
  0); a list field always has at least one token ('' when empty), and '' is hashed like any token.
- Vocabulary features: the row is the value's index; values outside the vocabulary are dropped
  (they get no slot), so the mean is over the in-vocabulary values, and a feature with none left
  has all-zero weights. The missing scalar '' is dropped too but is not counted as out of
  vocabulary.
- List features keep their first `max_len` (in-vocabulary) values and pool them by mean over the
  values kept: weight 1/kept per slot. The reference pools all values; the two agree whenever a
  list fits in `max_len`, and `ParseStats.truncated_values` counts the values that did not.
- Dense list features (price_list, hours_list) are the mean of all their numbers; every number
  must parse, as in the reference's `string_to_number` (so '1;;2' is a bad row).
- Transform 'log1p' (Criteo) clamps negatives to 0, then takes log(1 + x).
- Bytes that are not UTF-8 are kept as they are (decoded with 'surrogateescape') and hashed as the
  same raw bytes, which is what TensorFlow does with them; `ParseStats.non_utf8_lines` counts the
  lines that had any. In a numeric field they are a bad row like any other non-number.
- CRLF line ends and a UTF-8 byte order mark at the start of a file are removed (TensorFlow would
  keep the BOM and fail on the first label). Quotes are not special (the data has none).

Bad rows (wrong field count, a non-number in a numeric field, a label other than 0/1) raise
`DataError` naming the file, line and column, or with `skip_bad_rows=True` are dropped and counted.

Speed (60-80k ELM rows/s with ~10-token lists on one loaded core; `PYTHONPATH=. python
tests/input_pipeline_test.py` measures it): the work is vectorised per column of a chunk of lines.
Hashed and numeric tokens are never made into Python strings: their byte ranges are found with
numpy in the column's UTF-8 bytes, where a numpy Fingerprint64 hashes them (checked against
pyfarmhash for every length in the tests) and a numpy decimal parser reads the plain numbers
(exactly, as float() would; other spellings go to float() one by one). The padded layout is a
few numpy scatters. Nothing loops over rows in Python except to name a bad row. `num_workers`
parses in worker processes when one core is not enough.
"""

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import glob
import gzip
import itertools
import multiprocessing
import operator
import os
import queue
import re
import signal
import sys
import threading
import weakref
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import farmhash
import numpy as np

from dlrm_jax import feature_spec as feature_spec_lib

Batch = Dict[str, np.ndarray]
Paths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

# Bad rows whose messages are kept in ParseStats, for results.json and logs.
MAX_BAD_ROW_EXAMPLES = 10

# Bump whenever a change here (or in torchrec_npy, for a triple's rows) changes what some line
# parses into (or whether it parses): caches of parsed rows (row_cache) record it and are rebuilt
# when it changes.
PARSER_VERSION = 3  # 3: ELM integers beyond int32 are refused


class DataError(ValueError):
  """An input file that cannot be read as the spec says: names the file, line and column."""

  def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None,
               column: Optional[str] = None):
    super().__init__(message)
    self.path = path
    self.line = line
    self.column = column


@dataclasses.dataclass
class ParseStats:
  """Counters updated in place while parsing; all of them are for this process's rows only.

  rows: rows parsed into batches. bad_rows: rows dropped by `skip_bad_rows`. truncated_values:
  list values beyond a feature's `max_len`. lines: lines this process looked at (good or bad).
  oov_values: present values outside a vocabulary feature's vocabulary. non_utf8_lines: lines
  holding bytes that are not UTF-8. source_lines: lines of the input read, every process's share
  included (all lines, for one process). bad_row_examples: the first few bad-row messages.
  """
  rows: int = 0
  bad_rows: int = 0
  truncated_values: int = 0
  lines: int = 0
  oov_values: int = 0
  non_utf8_lines: int = 0
  source_lines: int = 0
  bad_row_examples: List[str] = dataclasses.field(default_factory=list)

  def as_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def record_bad_rows(self, count: int, messages: Sequence[str]) -> None:
    """Counts `count` dropped rows and keeps the first few of their `messages`."""
    self.bad_rows += count
    room = max(0, MAX_BAD_ROW_EXAMPLES - len(self.bad_row_examples))
    self.bad_row_examples.extend(messages[:room])

  def add(self, other: 'ParseStats') -> None:
    """Adds the counts of `other` (e.g. from a worker process) to these."""
    for field in dataclasses.fields(self):
      if field.name != 'bad_row_examples':
        setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
    room = max(0, MAX_BAD_ROW_EXAMPLES - len(self.bad_row_examples))
    self.bad_row_examples.extend(other.bad_row_examples[:room])


# ------------------------------------------------------------------------------------------------
# What parsing needs from a spec, resolved once.

@dataclasses.dataclass(frozen=True)
class _SparsePlan:
  column: int
  slot: int
  max_len: int
  is_list: bool
  rows: int
  vocabulary: Optional[Dict[str, int]]


@dataclasses.dataclass(frozen=True)
class _DensePlan:
  column: int
  is_list: bool
  log1p: bool


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Column indices and defaults of a spec, in the form the parser's inner loops want."""
  names: Tuple[str, ...]
  kinds: Tuple[str, ...]
  defaults: Tuple[str, ...]
  delimiter: str
  separator: str
  label: int                     # -1: the rows have no label column (label 0)
  numeric: Tuple[int, ...]       # every 'int' / 'float' column: all are validated
  strings: Tuple[int, ...]       # the other columns some feature reads
  sparse: Tuple[_SparsePlan, ...]
  dense: Tuple[_DensePlan, ...]
  num_slots: int


@functools.lru_cache(maxsize=16)
def _plan(spec: feature_spec_lib.FeatureSpec) -> _Plan:
  names = tuple(c.name for c in spec.columns)
  kinds = tuple(c.kind for c in spec.columns)
  unknown = set(kinds) - {'int', 'float', 'str'}
  if unknown:
    raise ValueError(f'spec {spec.name}: unknown column kinds {sorted(unknown)}')
  # The byte-level tokenizer needs a one-byte list separator; '\n' marks row ends there.
  separator = spec.list_separator
  if len(separator) != 1 or not separator.isascii() or separator in ('\n', spec.delimiter):
    raise ValueError(f'spec {spec.name}: list_separator {separator!r} must be one ASCII '
                     'character other than a line break and the delimiter')
  if not spec.delimiter or '\n' in spec.delimiter:
    raise ValueError(f'spec {spec.name}: bad delimiter {spec.delimiter!r}')
  sparse = []
  for feature, slot in zip(spec.sparse, spec.slot_starts):
    vocabulary = None
    if feature.vocabulary is not None:
      vocabulary = {v: i for i, v in enumerate(feature.vocabulary)}
    sparse.append(_SparsePlan(spec.column_index(feature.column), slot, feature.max_len,
                              feature.is_list, spec.table(feature.table).rows, vocabulary))
  dense = []
  for feature in spec.dense:
    if feature.transform not in ('identity', 'log1p'):
      raise ValueError(f'spec {spec.name}: dense {feature.column!r} has unknown transform '
                       f'{feature.transform!r}')
    dense.append(_DensePlan(spec.column_index(feature.column), feature.is_list,
                            feature.transform == 'log1p'))
  numeric = tuple(i for i, k in enumerate(kinds) if k != 'str')
  used = {p.column for p in sparse} | {p.column for p in dense}
  strings = tuple(sorted(i for i in used if kinds[i] == 'str'))
  return _Plan(names=names, kinds=kinds, defaults=tuple(c.default for c in spec.columns),
               delimiter=spec.delimiter, separator=spec.list_separator,
               label=spec.column_index(spec.label) if spec.label else -1, numeric=numeric,
               strings=strings, sparse=tuple(sparse), dense=tuple(dense),
               num_slots=spec.num_slots)


# ------------------------------------------------------------------------------------------------
# Tokens.
#
# A column's tokens are located in the UTF-8 bytes of its values joined by '\n' (which no field
# can hold, so it marks row ends), and numbers and hashes are computed there with numpy: no Python
# string is made per token.

_PAD = 8  # zero bytes after the data, so the 8-byte loads of a token near the end stay inside


def _utf8(text: str) -> bytes:
  try:
    # Undecodable input bytes were kept by 'surrogateescape': this gives back those same bytes,
    # which are what TensorFlow hashes.
    return text.encode('utf-8', 'surrogateescape')
  except UnicodeEncodeError:
    # Other lone surrogates can only come from strings built in Python, not from files.
    return text.encode('utf-8', 'surrogatepass')


@dataclasses.dataclass
class _Spans:
  """Tokens as (start, length) byte ranges of `data`, and the number of tokens of each row."""
  data: np.ndarray     # uint8, followed by _PAD zero bytes
  starts: np.ndarray   # int64 [tokens]
  lengths: np.ndarray  # int64 [tokens]
  counts: np.ndarray   # int64 [rows], >= 1: an empty list is one '' token


def _token_spans(values: Sequence[str], separator: Optional[str]) -> _Spans:
  """The tokens of `values` split on `separator` (one token per value when it is None)."""
  if not values:
    empty = np.zeros(0, np.int64)
    return _Spans(np.zeros(_PAD, np.uint8), empty, empty, empty)
  data = np.frombuffer(_utf8('\n'.join(values)) + bytes(_PAD), np.uint8)
  text = data[:-_PAD]
  row_end = text == ord('\n')
  cuts = np.flatnonzero(row_end if separator is None else row_end | (text == ord(separator)))
  starts = np.concatenate([[0], cuts + 1])
  lengths = np.append(cuts, len(text)) - starts
  if separator is None:
    counts = np.ones(len(values), np.int64)
  else:
    # Row r ends at the r-th '\n' cut, so the tokens through row r are that cut's index + 1.
    through = np.append(np.flatnonzero(row_end[cuts]), len(cuts)) + 1
    counts = np.diff(through, prepend=0)
  return _Spans(data, starts, lengths, counts)


def _token_text(spans: _Spans, i: int) -> str:
  start = spans.starts[i]
  return spans.data[start:start + spans.lengths[i]].tobytes().decode('utf-8', 'surrogateescape')


# ------------------------------------------------------------------------------------------------
# Numbers.
#
# The common spellings, [+-]digits[.digits] with at most 15 digits, are parsed in numpy; anything
# else (spaces, exponents, mistakes) goes through the strict grammar and float() one at a time.

_SPACE = ' \t\n\r\f\v'
_INT_GRAMMAR = re.compile(f'[{_SPACE}]*[+-]?[0-9]+[{_SPACE}]*')
_FLOAT_GRAMMAR = re.compile(
    f'[{_SPACE}]*[+-]?(?:[0-9]+\\.?[0-9]*|\\.[0-9]+)(?:[eE][+-]?[0-9]+)?[{_SPACE}]*')
_FAST_DIGITS = 15  # any 15-digit integer is exact in float64
_FAST_WIDTH = _FAST_DIGITS + 2  # room for a sign and a point
_POWERS_OF_TEN = np.array([float(10 ** k) for k in range(_FAST_DIGITS + 1)])  # all exact
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# A number column's "value" that reads as a column name ('clicked', 'I1'): a header line. Not
# the words a number column may hold by mistake in a real row ('nan', 'NA', 'null', ...).
_HEADER_LIKE = re.compile(r"got '([A-Za-z_][A-Za-z0-9_ ]*)'$")
_NOT_HEADER = frozenset({'nan', 'inf', 'infinity', 'na', 'null', 'none', 'true', 'false'})
_INT32 = (-2**31, 2**31 - 1)


def _number_problem(value: str, kind: str) -> Optional[str]:
  """Why `value` is not a valid `kind` number, or None if it is."""
  grammar = _INT_GRAMMAR if kind == 'int' else _FLOAT_GRAMMAR
  if not grammar.fullmatch(value):
    if kind == 'int' and _FLOAT_GRAMMAR.fullmatch(value):
      return f'expected an integer, got {value!r}'
    return f'expected {"an integer" if kind == "int" else "a number"}, got {value!r}'
  try:
    if np.isfinite(float(value)):
      return None
  except OverflowError:
    pass
  return f'{value!r} is out of range'


def _parse_plain_decimals(spans: _Spans) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(value, is plain, has a point) of every token, where plain means [+-]digits[.digits].

  Exact, not approximate: the digits (at most 15) make an integer that float64 holds exactly, and
  dividing it by an exact power of ten rounds once, correctly, as float() does (Clinger's fast
  path). Tokens that are not plain get value 0 here.
  """
  data, starts, lengths = spans.data, spans.starts, spans.lengths
  n = len(starts)
  mantissa = np.zeros(n, np.int64)
  digits = np.zeros(n, np.int64)
  fraction_digits = np.zeros(n, np.int64)
  point = np.zeros(n, bool)
  first = data[starts]
  negative = first == ord('-')
  signed = negative | (first == ord('+'))
  plain = (lengths >= 1) & (lengths <= _FAST_WIDTH)
  for k in range(int(min(lengths.max(initial=0), _FAST_WIDTH))):
    inside = k < lengths
    byte = data[np.where(inside, starts + k, 0)].astype(np.int64)
    digit = byte - ord('0')
    is_digit = inside & (digit >= 0) & (digit <= 9)
    is_point = inside & (byte == ord('.'))
    allowed = is_digit | is_point | (signed if k == 0 else False)
    plain &= ~inside | allowed
    plain &= ~(is_point & point)
    mantissa = np.where(is_digit, mantissa * 10 + digit, mantissa)
    digits += is_digit
    fraction_digits += is_digit & point
    point |= is_point
  plain &= (digits >= 1) & (digits <= _FAST_DIGITS)
  values = mantissa / _POWERS_OF_TEN[np.minimum(fraction_digits, _FAST_DIGITS)]
  values[negative] *= -1.0
  values[~plain] = 0.0
  return values, plain, point


def _parse_spans(spans: _Spans, kind: str) -> Tuple[np.ndarray, Dict[int, str]]:
  """float64 value of every token and {token index: problem} for those not `kind` numbers."""
  values, plain, point = _parse_plain_decimals(spans)
  if kind == 'int':
    plain &= ~point
  problems = {}
  for i in np.flatnonzero(~plain).tolist():
    value = _token_text(spans, i)
    problem = _number_problem(value, kind)
    if problem is None:
      values[i] = float(value)
    else:
      values[i] = 0.0
      problems[i] = problem
  if kind == 'int':
    values += 0.0  # an integer has no negative zero
  return values, problems


def _parse_numbers(values: Sequence[str], kind: str) -> Tuple[np.ndarray, Dict[int, str]]:
  """float64 values of `values` and {index: problem} for those that are not `kind` numbers."""
  return _parse_spans(_token_spans(values, None), kind)


def _split_lists(values: Sequence[str], separator: str) -> Tuple[List[str], np.ndarray]:
  """All tokens of `values` as strings, row after row, and each row's token count."""
  return separator.join(values).split(separator), _token_spans(values, separator).counts


def _list_means(values: Sequence[str], separator: str) -> Tuple[np.ndarray, Dict[int, str]]:
  """Mean of each value's separator-split numbers, and {row: problem} for unparsable rows."""
  if not values:
    return np.zeros(0, np.float64), {}  # reduceat needs at least one row
  spans = _token_spans(values, separator)
  numbers, problems = _parse_spans(spans, 'float')
  starts = np.cumsum(spans.counts) - spans.counts
  means = np.add.reduceat(numbers, starts) / spans.counts
  if not problems:
    return means, {}
  bad_tokens = np.fromiter(problems, np.int64, len(problems))
  rows = np.searchsorted(starts, bad_tokens, side='right') - 1
  row_problems = {}
  for row, token in zip(rows.tolist(), bad_tokens.tolist()):
    row_problems.setdefault(row, f'list value {token - int(starts[row]) + 1}: {problems[token]}')
  return means, row_problems


# ------------------------------------------------------------------------------------------------
# Sparse ids: a numpy FarmHash Fingerprint64 of the tokens' bytes, and the padded layout.

# FarmHash Fingerprint64 is farmhashna::Hash64; these are its constants and, below, its cases for
# strings of 0-16 and 17-32 bytes (longer tokens, rare in CTR data, go to the pyfarmhash call).
_K0 = np.uint64(0xc3a5c85c97cb3127)
_K1 = np.uint64(0xb492b66fbe98f273)
_K2 = np.uint64(0x9ae16a3b2f90404f)


def _rotate(v: np.ndarray, shift: int) -> np.ndarray:
  return (v >> np.uint64(shift)) | (v << np.uint64(64 - shift))


def _shift_mix(v: np.ndarray) -> np.ndarray:
  return v ^ (v >> np.uint64(47))


def _hash_len16(u: np.ndarray, v: np.ndarray, mul: np.ndarray) -> np.ndarray:
  a = _shift_mix((u ^ v) * mul)
  b = _shift_mix((v ^ a) * mul)
  return b * mul


def _fingerprint_spans(spans: _Spans) -> np.ndarray:
  """uint64 Fingerprint64 of every token of `spans` (uint64 arithmetic wraps, as in C)."""
  data, starts, lengths = spans.data, spans.starts, spans.lengths
  # Little-endian loads at any byte offset: views with a one-byte stride.
  load64 = np.ndarray((len(data) - 7,), '<u8', buffer=data, strides=(1,))
  load32 = np.ndarray((len(data) - 3,), '<u4', buffer=data, strides=(1,))
  out = np.full(len(starts), _K2, np.uint64)  # the hash of '' is k2

  case = (lengths >= 8) & (lengths <= 16)
  if case.any():
    s, n = starts[case], lengths[case]
    mul = _K2 + n.astype(np.uint64) * np.uint64(2)
    a = load64[s] + _K2
    b = load64[s + n - 8]
    c = _rotate(b, 37) * mul + a
    d = (_rotate(a, 25) + b) * mul
    out[case] = _hash_len16(c, d, mul)
  case = (lengths >= 4) & (lengths < 8)
  if case.any():
    s, n = starts[case], lengths[case]
    mul = _K2 + n.astype(np.uint64) * np.uint64(2)
    a = load32[s].astype(np.uint64)
    out[case] = _hash_len16(n.astype(np.uint64) + (a << np.uint64(3)),
                            load32[s + n - 4].astype(np.uint64), mul)
  case = (lengths >= 1) & (lengths < 4)
  if case.any():
    s, n = starts[case], lengths[case]
    y = data[s].astype(np.uint64) + (data[s + (n >> 1)].astype(np.uint64) << np.uint64(8))
    z = n.astype(np.uint64) + (data[s + n - 1].astype(np.uint64) << np.uint64(2))
    out[case] = _shift_mix(y * _K2 ^ z * _K0) * _K2
  case = (lengths > 16) & (lengths <= 32)
  if case.any():
    s, n = starts[case], lengths[case]
    mul = _K2 + n.astype(np.uint64) * np.uint64(2)
    a = load64[s] * _K1
    b = load64[s + 8]
    c = load64[s + n - 8] * mul
    d = load64[s + n - 16] * _K2
    out[case] = _hash_len16(_rotate(a + b, 43) + _rotate(c, 30) + d,
                            a + _rotate(b + _K2, 18) + c, mul)
  for i in np.flatnonzero(lengths > 32).tolist():
    out[i] = farmhash.fingerprint64(data[starts[i]:starts[i] + lengths[i]].tobytes())
  return out


def fingerprint64(values: Sequence[str]) -> np.ndarray:
  """uint64 FarmHash Fingerprint64 of each string's UTF-8 bytes (TensorFlow's string hash)."""
  encoded = [_utf8(v) for v in values]
  lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
  data = np.frombuffer(b''.join(encoded) + bytes(_PAD), np.uint8)
  return _fingerprint_spans(_Spans(data, np.cumsum(lengths) - lengths, lengths, None))


def _vocabulary_rows(values: Sequence[str], vocabulary: Dict[str, int]) -> np.ndarray:
  """Index of each value in the vocabulary, -1 outside it."""
  return np.fromiter(map(vocabulary.get, values, itertools.repeat(-1)), np.int64, len(values))


def _scatter_list(ids: np.ndarray, weights: np.ndarray, plan: _SparsePlan, counts: np.ndarray,
                  rows: np.ndarray, keep: Optional[np.ndarray],
                  stats: Optional[ParseStats]) -> None:
  """Writes the tokens of a list feature into its `max_len` slots, weights 1/kept for a mean.

  `counts` is the number of tokens of each row; `rows` the table row of every token, row after
  row; `keep` (None: all) says which tokens count (not those out of vocabulary).
  """
  n = len(counts)
  owner = np.repeat(np.arange(n), counts)
  if keep is not None and not keep.all():
    owner, rows = owner[keep], rows[keep]
    counts = np.bincount(owner, minlength=n)
  starts = np.cumsum(counts) - counts
  position = np.arange(len(owner)) - starts[owner]
  kept = np.minimum(counts, plan.max_len)
  if n and counts.max() > plan.max_len:
    inside = position < plan.max_len
    owner, rows, position = owner[inside], rows[inside], position[inside]
    if stats is not None:
      stats.truncated_values += int((counts - kept).sum())
  mean_weight = np.zeros(n, np.float32)
  np.divide(1.0, kept, out=mean_weight, where=kept > 0, casting='unsafe')
  # One flat index per token: a 1-D scatter is much cheaper than a (row, slot) pair scatter.
  flat = owner * ids.shape[1] + (plan.slot + position)
  ids.reshape(-1)[flat] = rows
  weights.reshape(-1)[flat] = mean_weight[owner]


def _feature_rows(plan: _SparsePlan, values: Sequence[str], separator: str,
                  stats: Optional[ParseStats]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(table row of every token, tokens per row or None for a scalar, which tokens count or None
  for all) of one feature."""
  if plan.vocabulary is None:
    spans = _token_spans(values, separator if plan.is_list else None)
    rows = (_fingerprint_spans(spans) % np.uint64(plan.rows)).astype(np.int64)
    # Every list token counts ('' too); a scalar counts unless it is ''.
    present = None if plan.is_list else spans.lengths > 0
    return rows, spans.counts, present
  counts = None
  if plan.is_list:
    values, counts = _split_lists(values, separator)
  rows = _vocabulary_rows(values, plan.vocabulary)
  present = rows >= 0
  if stats is not None:
    # '' (a missing scalar, or the token of an empty list) is not out of vocabulary.
    stats.oov_values += sum(1 for i in np.flatnonzero(~present).tolist() if values[i])
  if not plan.is_list and '' in plan.vocabulary:
    present &= np.fromiter(map(bool, values), bool, len(values))  # '' is missing, always
  return rows, counts, present


def _fill_sparse(out: Batch, plan: _Plan, columns: Dict[int, List[str]],
                 stats: Optional[ParseStats]) -> None:
  """Writes the ids and weights of every sparse feature into `out`."""
  ids, weights = out['ids'], out['weights']
  n, num_slots = ids.shape
  scalar_slots, scalar_ids, scalar_weights = [], [], []
  for feature in plan.sparse:
    rows, counts, present = _feature_rows(feature, columns[feature.column], plan.separator,
                                          stats)
    if feature.is_list:
      _scatter_list(ids, weights, feature, counts, rows, present, stats)
    else:
      scalar_slots.append(feature.slot)
      scalar_ids.append(np.where(present, rows, 0))
      scalar_weights.append(present)
  if scalar_slots:
    # One row-major scatter for all scalars: a column write per feature into the wide output
    # touches a cache line per row each time and costs several times more.
    flat = (np.arange(n)[:, None] * num_slots + np.asarray(scalar_slots)).reshape(-1)
    ids.reshape(-1)[flat] = np.stack(scalar_ids, axis=1).reshape(-1)
    weights.reshape(-1)[flat] = np.stack(scalar_weights, axis=1).reshape(-1)


# ------------------------------------------------------------------------------------------------
# Chunks of lines.

def _empty_chunk(num_dense: int, num_slots: int, n: int = 0) -> Batch:
  return {'label': np.zeros(n, np.float32), 'dense': np.zeros((n, num_dense), np.float32),
          'ids': np.zeros((n, num_slots), np.int32),
          'weights': np.zeros((n, num_slots), np.float32)}


def _with_default(values: List[str], default: str) -> List[str]:
  if default and '' in values:
    return [v or default for v in values]
  return values


_SURROGATE = re.compile('[\udc80-\udcff]')


def _field_count_problem(line: str, plan: _Plan) -> Tuple[int, str]:
  """(column index, message) for a line without one field per column."""
  found = line.count(plan.delimiter) + 1
  expected = len(plan.names)
  if found < expected:
    return found, (f'{found} fields, expected {expected}: no field for column '
                   f'{plan.names[found]!r} onwards')
  # Lines ended by a lone CR (old Mac files) read as one line of every row's fields.
  hint = ' (lines ended by CR alone? convert them to LF)' if '\r' in line.rstrip('\r') else ''
  return expected - 1, (f'{found} fields, expected {expected}: extra fields after the last '
                        f'column {plan.names[-1]!r}{hint}')


# A bad row found while parsing: (index in the chunk's lines, column index, message).
_Problem = Tuple[int, int, str]


def _splittable(lines: List[str], plan: _Plan, problems: List[_Problem]) -> np.ndarray:
  """Whether each line has one field per column (only those can be split column-wise)."""
  field_counts = np.fromiter(map(str.count, lines, itertools.repeat(plan.delimiter)), np.int64,
                             len(lines))
  ok = field_counts == len(plan.names) - 1
  for i in np.flatnonzero(~ok).tolist():
    problems.append((i, *_field_count_problem(lines[i], plan)))
  # A line break inside a line (possible only for lines not read by this module) would end a
  # row early for the tokenizer.
  if any(map(operator.contains, lines, itertools.repeat('\n'))):
    for i, line in enumerate(lines):
      if '\n' in line and ok[i]:
        ok[i] = False
        column = line[:line.index('\n')].count(plan.delimiter)
        problems.append((i, column, 'a line break inside the line'))
  return ok


def _columns(lines: List[str], plan: _Plan) -> Dict[int, List[str]]:
  """The fields of the columns parsing reads, empty ones replaced by the column's default."""
  if not lines:
    return {c: [] for c in plan.numeric + plan.strings}
  fields = plan.delimiter.join(lines).split(plan.delimiter)
  ncols = len(plan.names)
  return {c: _with_default(fields[c::ncols], plan.defaults[c])
          for c in plan.numeric + plan.strings}


def _numeric_inputs(columns: Dict[int, List[str]], plan: _Plan, line_of: np.ndarray,
                    problems: List[_Problem]) -> Tuple[np.ndarray, np.ndarray]:
  """(label f64[n], dense f64[n, num_dense]) after the dense transforms; every numeric column
  checked, and every dense value checked to fit in float32."""
  numbers = {}

  def check(column, values, kind):
    parsed, bad = _parse_numbers(values, kind)
    problems.extend((int(line_of[row]), column, message) for row, message in bad.items())
    return parsed

  for c in plan.numeric:
    numbers[c] = check(c, columns[c], plan.kinds[c])
  if plan.label < 0:
    label = np.zeros(len(line_of), np.float64)
  else:
    label = numbers[plan.label]  # 0 where it did not parse, so reported once
  for row in np.flatnonzero((label != 0) & (label != 1)).tolist():
    problems.append((int(line_of[row]), plan.label,
                     f'label must be 0 or 1, got {columns[plan.label][row]!r}'))
  dense = np.zeros((len(label), len(plan.dense)), np.float64)
  for j, feature in enumerate(plan.dense):
    if feature.is_list:
      dense[:, j], bad = _list_means(columns[feature.column], plan.separator)
      problems.extend((int(line_of[row]), feature.column, message)
                      for row, message in bad.items())
    elif feature.column in numbers:
      dense[:, j] = numbers[feature.column]
      if plan.kinds[feature.column] == 'int' and not feature.log1p:
        for row in np.flatnonzero((dense[:, j] < _INT32[0]) | (dense[:, j] > _INT32[1])).tolist():
          problems.append((int(line_of[row]), feature.column,
                           f'{columns[feature.column][row]!r} does not fit in int32 (the '
                           'reference reads the column as int32)'))
    else:
      dense[:, j] = check(feature.column, columns[feature.column], 'float')
    if feature.log1p:
      dense[:, j] = np.log1p(np.maximum(dense[:, j], 0.0))
  # A finite float64 beyond float32's range would become inf in the batch and NaN in the loss.
  too_big = np.abs(dense) > _FLOAT32_MAX
  for row, j in zip(*np.nonzero(too_big)):
    feature = plan.dense[j]
    problems.append((int(line_of[row]), feature.column,
                     f'{columns[feature.column][row]!r} does not fit in float32'
                     + (' (list mean)' if feature.is_list else '')))
  return label, dense


def _report(problems: List[_Problem], plan: _Plan, path: str, first_line: int,
            line_step: int) -> List[str]:
  """Messages for the problems, one per bad line (its first column's), in line order."""
  first_per_line = {}
  for index, column, message in sorted(problems):
    first_per_line.setdefault(index, (column, message))
  messages = []
  for index, (column, message) in first_per_line.items():
    line = first_line + index * line_step
    header = _HEADER_LIKE.search(message)
    if line == 1 and header and header.group(1).lower() not in _NOT_HEADER:
      message += ' (a header line? The ELM and Criteo files have none: remove it)'
    messages.append(f'{path}:{line}: column {plan.names[column]!r}: {message}')
  return messages


def parse_chunk(lines: List[str], spec: feature_spec_lib.FeatureSpec, *, path: str,
                first_line: int, skip_bad_rows: bool = False, stats: Optional[ParseStats] = None,
                line_step: int = 1) -> Batch:
  """Parses lines (without line terminators) into the spec's batch layout.

  Args:
    lines: the rows' text.
    spec: the feature spec.
    path: the file the lines come from, for error messages.
    first_line: 1-based line number of `lines[0]` in `path`.
    skip_bad_rows: drop and count bad rows instead of raising `DataError`.
    stats: counters to update, if given.
    line_step: line-number distance between consecutive `lines` (the process count when each
      process reads every n-th line).

  Returns:
    {'label': f32[n], 'dense': f32[n, num_dense], 'ids': i32[n, num_slots],
     'weights': f32[n, num_slots]} for the n rows that parse, in input order.

  Raises:
    DataError: for the first bad row (by line), unless `skip_bad_rows`.
  """
  plan = _plan(spec)
  if stats is not None:
    stats.lines += len(lines)
  problems: List[_Problem] = []
  ok = _splittable(lines, plan, problems)
  line_of = np.flatnonzero(ok)  # index in `lines` of each splittable row
  if len(line_of) < len(lines):
    lines = [lines[i] for i in line_of.tolist()]
  columns = _columns(lines, plan)
  label, dense = _numeric_inputs(columns, plan, line_of, problems)

  if problems:
    messages = _report(problems, plan, path, first_line, line_step)
    if not skip_bad_rows:
      index, column, _ = min(problems)
      line = first_line + index * line_step
      raise DataError(messages[0], path, line, plan.names[column])
    if stats is not None:
      stats.record_bad_rows(len(messages), messages)
    keep = np.flatnonzero(~np.isin(line_of, [p[0] for p in problems])).tolist()
    label, dense = label[keep], dense[keep]
    columns = {c: [columns[c][i] for i in keep] for c in plan.strings}
    lines = [lines[i] for i in keep]

  n = len(lines)
  if stats is not None:
    stats.rows += n
    if not all(map(str.isascii, lines)):
      stats.non_utf8_lines += sum(1 for line in lines if _SURROGATE.search(line))
  out = _empty_chunk(len(plan.dense), plan.num_slots, n)
  if n:
    out['label'][:] = label
    out['dense'][:] = dense  # transformed already
    _fill_sparse(out, plan, columns, stats)
  return out


# ------------------------------------------------------------------------------------------------
# Files.

def expand_paths(paths: Paths) -> List[str]:
  """A path, a list of paths, or glob patterns -> existing files, checked before any reading."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(os.fspath, paths):
    if os.path.exists(path):
      files.append(path)
      continue
    matches = sorted(glob.glob(path)) if glob.has_magic(path) else []
    if not matches:
      raise FileNotFoundError(f'input file {path!r} does not exist')
    files.extend(matches)
  if not files:
    raise FileNotFoundError('no input files given')
  for path in files:
    if os.path.isdir(path):
      raise IsADirectoryError(f'input path {path!r} is a directory, expected a CSV file')
  return files


_READ_BYTES = 1 << 22
# Far longer than any row of the formats read here (ELM's longest lists, before max_list_len cuts
# them, run to kilobytes).
_MAX_LINE_BYTES = 64 << 20
_GZIP_MAGIC = b'\x1f\x8b'
_BOM = b'\xef\xbb\xbf'


def _open_binary(path: str):
  """The file's bytes, decompressed when it is gzip (recognised by its magic number, so a
  compressed file needs no '.gz' name and a plain one named '.gz' still reads)."""
  f = open(path, 'rb')
  try:
    magic = f.read(2)
  except BaseException:
    f.close()
    raise
  if magic == _GZIP_MAGIC:
    f.close()
    return gzip.open(path, 'rb')
  f.seek(0)
  return f


def _read_blocks(path: str, line: Optional[Callable[[], int]] = None) -> Iterator[bytes]:
  """The file's (decompressed) bytes in blocks; a damaged gzip stream is a DataError naming the
  line it breaks in (`line()`: the number of the first line not yet complete)."""
  with _open_binary(path) as f:
    while True:
      # read1 pieces, so that what a damaged stream held before the damage is still read.
      pieces, size, error = [], 0, None
      while size < _READ_BYTES:
        try:
          piece = f.read1(_READ_BYTES - size)
        except (EOFError, OSError, zlib.error) as e:
          # EOFError: the gzip stream was cut short (a truncated download); the others: corrupt.
          error = e
          break
        if not piece:
          break
        pieces.append(piece)
        size += len(piece)
      if pieces:
        yield b''.join(pieces)
      if error is not None:
        where = f' in line {line()}' if line is not None else ''
        raise DataError(f'{path}: the compressed data is damaged{where}: {error}', path,
                        line() if line is not None else None) from error
      if not size:
        return


def _skip_lines(data: bytes, count: int) -> int:
  """Byte offset just after the `count`-th b'\\n' of `data` (which holds more than `count`)."""
  if count == 0:
    return 0
  newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord('\n'))
  return int(newlines[count - 1]) + 1


def _line_chunks(path: str, chunk_lines: int, skip: int = 0, limit: Optional[int] = None,
                 counter: Optional[List[int]] = None) -> Iterator[Tuple[int, List[str]]]:
  """(1-based number of the first line, lines without terminators) of `path`, streamed.

  The first `skip` lines are passed over without decoding; at most `limit` lines (None: all the
  rest) are read after them. Lines end at LF only, as for TextLineDataset (a CR inside a line
  stays); a CR before the LF (CRLF files) and a UTF-8 byte order mark at the start of the file
  are removed. Bytes that are not UTF-8 are kept (surrogateescape). `counter[0]` is increased by
  the lines passed over or read. An empty file is a DataError.
  """
  pending: List[str] = []
  next_line = 1  # number of the next line to come out
  tail = b''
  any_bytes = False

  def lines_of(data: bytes) -> List[str]:
    text = data.decode('utf-8', 'surrogateescape')
    if '\r' in text:
      text = text.replace('\r\n', '\n')
      lines = text.split('\n')
      if lines[-1].endswith('\r'):
        lines[-1] = lines[-1][:-1]
      return lines
    return text.split('\n')

  def complete_lines(data: bytes) -> Iterator[Tuple[int, List[str]]]:
    """Takes the complete lines `data` (no final LF), yields the full chunks they make."""
    nonlocal skip, limit, next_line, pending
    count = data.count(b'\n') + 1
    if skip >= count:
      skip -= count
      next_line += count
      if counter is not None:
        counter[0] += count
      return
    if skip:
      data = data[_skip_lines(data, skip):]
      next_line += skip
      if counter is not None:
        counter[0] += skip
      count -= skip
      skip = 0
    lines = lines_of(data)
    if limit is not None:
      lines = lines[:limit]
      limit -= len(lines)
    if counter is not None:
      counter[0] += len(lines)
    pending.extend(lines)
    while len(pending) >= chunk_lines:
      chunk, pending = pending[:chunk_lines], pending[chunk_lines:]
      yield next_line, chunk
      next_line += len(chunk)

  for block in _read_blocks(path, lambda: next_line + len(pending)):
    if not any_bytes:
      if block.startswith(_BOM):
        block = block[len(_BOM):]
      any_bytes = bool(block)
      if not block:
        continue
    data = tail + block if tail else block
    cut = data.rfind(b'\n')
    if cut < 0:
      if len(data) > _MAX_LINE_BYTES:
        # Not a CSV line: without this the whole file was read into one line (and copied once
        # per block) before its fields could be counted.
        hint = ' (lines ended by CR alone? convert them to LF)' if b'\r' in data else ''
        line = next_line + len(pending)
        raise DataError(f'{path}:{line}: no line feed in {len(data):,} bytes: not a line of a '
                        f'CSV file{hint}', path, line)
      tail = data
      continue
    tail = data[cut + 1:]
    yield from complete_lines(data[:cut])
    if limit is not None and limit <= 0:
      break
  else:
    if tail:
      yield from complete_lines(tail)
  if not any_bytes:
    raise DataError(f'{path}: the file is empty', path)
  if pending:
    yield next_line, pending


# (0-based first line, line after the last or None for the file's end)
LineRange = Tuple[int, Optional[int]]


def _line_jobs(files: List[str], chunk_rows: int, process_index: int, process_count: int,
               line_ranges: Optional[Sequence[Optional[LineRange]]] = None,
               stats: Optional[ParseStats] = None) -> Iterator[Tuple[str, int, List[str]]]:
  """(path, number of the first line, this process's lines), about `chunk_rows` lines each.

  `line_ranges[i]` (start, stop) keeps only those 0-based lines of file i (None: all of it).
  The kept lines of all files are numbered 0, 1, ... together, and process k of n takes those
  whose number is k modulo n.
  """
  seen = 0  # kept lines of all processes before the current chunk
  for i, path in enumerate(files):
    start, stop = (line_ranges[i] if line_ranges and line_ranges[i] else (0, None))
    limit = None if stop is None else max(0, stop - start)
    if limit == 0:
      continue
    counter = [0]
    for first_line, lines in _line_chunks(path, chunk_rows * process_count, start, limit,
                                          counter):
      offset = (process_index - seen) % process_count
      seen += len(lines)
      mine = lines[offset::process_count] if process_count > 1 else lines
      if mine:
        yield path, first_line + offset, mine
    if stats is not None:
      stats.source_lines += max(0, counter[0] - start)


def iter_row_chunks(paths: Paths, spec: feature_spec_lib.FeatureSpec, *, chunk_rows: int = 8192,
                    skip_bad_rows: bool = False, stats: Optional[ParseStats] = None,
                    process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                    line_ranges: Optional[Sequence[Optional[LineRange]]] = None,
                    postprocess: Optional[Callable[[Batch], Any]] = None) -> Iterator[Any]:
  """Parsed chunks of about `chunk_rows` rows of `paths`, one file after another.

  Lines are numbered 0, 1, ... across all files together, and process k of n keeps line i when
  i % n == k, so the shares of n processes are disjoint, cover every line and differ in size by
  at most one row. `line_ranges[i] = (start, stop)` reads only 0-based lines [start, stop) of
  file i (stop None: to the end); the numbering then counts the lines read. `num_workers > 0`
  parses in that many worker processes (the parser holds the GIL, so threads would not help);
  chunks, errors and `stats` are the same as with 0. The workers are spawned, so a script using
  them needs the usual `if __name__ == '__main__':` guard. `postprocess` (picklable, e.g. a
  module-level function) is applied to each chunk where it is parsed, so with workers only its
  result crosses the process boundary; its results are what this yields.
  """
  if num_workers <= 0:
    yield from _row_chunks(paths, spec, chunk_rows, skip_bad_rows, stats, process_index,
                           process_count, None, line_ranges, postprocess)
    return
  with contextlib.closing(_WorkerPool(spec, num_workers)) as pool:
    yield from _row_chunks(paths, spec, chunk_rows, skip_bad_rows, stats, process_index,
                           process_count, pool, line_ranges, postprocess)


def _row_chunks(paths: Paths, spec: feature_spec_lib.FeatureSpec, chunk_rows: int,
                skip_bad_rows: bool, stats: Optional[ParseStats], process_index: int,
                process_count: int, pool: Optional['_WorkerPool'],
                line_ranges: Optional[Sequence[Optional[LineRange]]] = None,
                postprocess: Optional[Callable[[Batch], Any]] = None) -> Iterator[Any]:
  """iter_row_chunks, in this process or in `pool`'s workers."""
  if chunk_rows < 1:
    raise ValueError(f'chunk_rows must be positive, got {chunk_rows}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  files = expand_paths(paths)
  if line_ranges is not None and len(line_ranges) != len(files):
    raise ValueError(f'{len(line_ranges)} line ranges for {len(files)} files')
  npy = _torchrec_npy()
  npy.check_one_encoding(files)
  if files and npy.reads_as_triple(files[0]):
    # Arrays need no parsing: numpy reads them faster here than workers could be sent them.
    chunks = npy.row_chunks(files, spec, chunk_rows, skip_bad_rows, stats, process_index,
                            process_count, line_ranges)
    yield from chunks if postprocess is None else map(postprocess, chunks)
    return
  jobs = _line_jobs(files, chunk_rows, process_index, process_count, line_ranges, stats)
  if pool is not None:
    yield from pool.parse(jobs, skip_bad_rows, stats, process_count, postprocess)
    return
  for path, first_line, lines in jobs:
    chunk = parse_chunk(lines, spec, path=path, first_line=first_line,
                        skip_bad_rows=skip_bad_rows, stats=stats, line_step=process_count)
    yield chunk if postprocess is None else postprocess(chunk)


def _torchrec_npy():
  # Imported when used: torchrec_npy builds on this module.
  from dlrm_jax import torchrec_npy  # pylint: disable=g-import-not-at-top
  return torchrec_npy


# The spec of a worker process, sent once when it starts rather than with every chunk.
_worker_spec: Optional[feature_spec_lib.FeatureSpec] = None
_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def refuse_while_a_process_starts(what: str) -> None:
  """Raises instead of running `what` in a spawned process that is still starting.

  A spawned process (the CSV parse workers are) first runs the script that started its parent,
  as `__mp_main__`. Without the `if __name__ == '__main__':` guard the script trained again in
  each worker: it made a run directory of its own, then waited forever for the row-cache lock
  that its parent held while waiting for the worker.
  """
  # Set by multiprocessing while a new process imports its parent's main script; Python's own
  # refusal to start processes then (spawn._check_not_importing_main) reads the same flag.
  if getattr(multiprocessing.current_process(), '_inheriting', False):
    raise RuntimeError(
        f'{what} was called while a new process (a CSV parse worker) was starting: it runs the '
        "script that started its parent again. Put the script's top-level code under "
        "`if __name__ == '__main__':`.")


def _start_worker(spec: feature_spec_lib.FeatureSpec, parent: int) -> None:
  global _worker_spec
  _worker_spec = spec
  # A trainer killed outright (SIGKILL, or SIGTERM while it caches) runs no cleanup: its
  # workers would wait for work forever. On Linux the kernel sends them SIGTERM when it dies.
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
      os._exit(1)  # pylint: disable=protected-access


def _parse_in_worker(path: str, first_line: int, lines: List[str], line_step: int,
                     skip_bad_rows: bool,
                     postprocess: Optional[Callable[[Batch], Any]]) -> Tuple[Any, ParseStats]:
  stats = ParseStats()
  chunk = parse_chunk(lines, _worker_spec, path=path, first_line=first_line,
                      skip_bad_rows=skip_bad_rows, stats=stats, line_step=line_step)
  return (chunk if postprocess is None else postprocess(chunk)), stats


class _WorkerPool:
  """Worker processes running parse_chunk, with a bounded number of chunks in flight.

  Workers end with the thread that started them (Linux's parent-death signal follows the
  thread): a generator holding a pool must be iterated by one thread, as every reader here is.
  """

  def __init__(self, spec: feature_spec_lib.FeatureSpec, num_workers: int):
    # 'spawn', not fork: the parent usually has JAX's threads running, which fork does not copy.
    self._executor = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context('spawn'),
        initializer=_start_worker, initargs=(spec, os.getpid()))
    # Two chunks per worker keep every worker busy; more would only hold memory.
    self._in_flight = 2 * num_workers

  def close(self) -> None:
    self._executor.shutdown(wait=False, cancel_futures=True)

  def parse(self, jobs: Iterator[Tuple[str, int, List[str]]], skip_bad_rows: bool,
            stats: Optional[ParseStats], line_step: int,
            postprocess: Optional[Callable[[Batch], Any]] = None) -> Iterator[Any]:
    """parse_chunk (then `postprocess`) over `jobs`, results (and errors) in input order."""
    pending = collections.deque()
    try:
      for job in itertools.chain(jobs, [None]):
        if job is not None:
          path, first_line, lines = job
          pending.append(self._executor.submit(_parse_in_worker, path, first_line, lines,
                                               line_step, skip_bad_rows, postprocess))
        while pending and (job is None or len(pending) >= self._in_flight):
          chunk, chunk_stats = pending.popleft().result()
          if stats is not None:
            stats.add(chunk_stats)
          yield chunk
    except concurrent.futures.process.BrokenProcessPool as e:
      # Raised by submit() too, once the pool is broken.
      raise RuntimeError(
          'a CSV parse worker process stopped: killed (for memory, say) or failed as it started '
          "(its error is printed above; a script without the `if __name__ == '__main__':` guard "
          'stops them so)') from e
    finally:
      for future in pending:
        future.cancel()


def estimate_lines(path: str) -> int:
  """About how many lines a file has, from its first few MB (a gzip file's by its compressed
  size): for progress and disk-space estimates, never for step counts."""
  if _torchrec_npy().reads_as_triple(path):
    return _torchrec_npy().count_rows(path)  # exactly, from the header
  with _open_binary(path) as f:
    head = f.read(_READ_BYTES)
    raw = getattr(f, 'fileobj', None)  # a GzipFile's compressed stream
    consumed = raw.tell() if raw is not None else len(head)
  if not head:
    return 0
  lines = head.count(b'\n') + (head[-1:] != b'\n')
  if len(head) < _READ_BYTES:
    return lines
  return int(lines * os.path.getsize(path) / max(consumed, 1))


def count_rows(path: Paths) -> int:
  """Lines in a file (or files, gzip'd or not): newline count, plus one for a last line without
  a newline. A file holding only a byte order mark has none."""
  total = 0
  for name in expand_paths(path):
    if _torchrec_npy().reads_as_triple(name):
      total += _torchrec_npy().count_rows(name)
      continue
    last = b'\n'
    first = True
    for block in _read_blocks(name):
      if first:
        first = False
        if block.startswith(_BOM):
          block = block[len(_BOM):]
          if not block:
            first = True
            continue
      total += block.count(b'\n')
      last = block[-1:]
    total += last != b'\n'
  return total


def scoring_spec(paths: Paths, spec: feature_spec_lib.FeatureSpec) -> feature_spec_lib.FeatureSpec:
  """The spec to read rows to score with: `spec`, or `spec.unlabeled()` when the first file's
  first line has one field fewer than `spec` has columns (rows without the label, as Criteo's
  test.txt). Every row must then have the same form: a row of the other one is a bad row. A
  TorchRec triple is unlabelled when its first label is -1 (its labels are then not read)."""
  files = expand_paths(paths)
  if files and _torchrec_npy().reads_as_triple(files[0]):
    return spec.unlabeled() if _torchrec_npy().unlabelled(files[0]) else spec
  first = next(_line_chunks(files[0], 1, limit=1), None) if files else None
  if not spec.label or first is None:
    return spec
  fields = first[1][0].count(spec.delimiter) + 1
  return spec.unlabeled() if fields == len(spec.columns) - 1 else spec


# ------------------------------------------------------------------------------------------------
# Shuffling and batching.

def _num_rows(block: Batch) -> int:
  return len(block['label'])


def _take(block: Batch, index) -> Batch:
  return {k: v[index] for k, v in block.items()}


def _concat(blocks: List[Batch]) -> Batch:
  if len(blocks) == 1:
    return blocks[0]
  return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


class _BatchAssembler:
  """Gathers chosen rows of blocks into batches of a fixed size, copying each row once."""

  def __init__(self, batch_size: int):
    self._size = batch_size
    self._batch = None
    self._filled = 0

  def add(self, source: Batch, rows: np.ndarray) -> Iterator[Batch]:
    """Appends `source[rows]`, yielding every batch this completes."""
    while len(rows):
      if self._batch is None:
        self._batch = {k: np.empty((self._size,) + v.shape[1:], v.dtype)
                       for k, v in source.items()}
      take = min(len(rows), self._size - self._filled)
      for k, v in source.items():
        np.take(v, rows[:take], axis=0, out=self._batch[k][self._filled:self._filled + take])
      self._filled += take
      rows = rows[take:]
      if self._filled == self._size:
        yield self._batch
        self._batch, self._filled = None, 0

  def rest(self) -> Iterator[Batch]:
    """The rows of an unfinished batch, as a smaller block."""
    if self._filled:
      yield _take(self._batch, slice(0, self._filled))
      self._batch, self._filled = None, 0


def _shuffle_rows(blocks: Iterable[Batch], buffer_size: int, rng: np.random.Generator,
                  assembler: _BatchAssembler) -> Iterator[Batch]:
  """tf.data's shuffle, a block of draws at a time, written straight into batches.

  A buffer of `buffer_size` rows is filled first; then each incoming row takes the place of a row
  drawn uniformly from the buffer, which goes out; at the end the buffer leaves in random order.
  Draws are made `buffer_size // 64` at a time (distinct within a draw, where tf.data draws one
  by one: a negligible change to the order's distribution) and carried across blocks, so the
  order depends on the seed, the buffer size and the rows only, not on chunk or batch sizes.
  """
  draw_size = max(1, buffer_size // 64)
  buffer = None
  filled = 0
  drawn = np.zeros(0, np.int64)  # buffer slots drawn and not yet replaced
  for block in blocks:
    n = _num_rows(block)
    if buffer is None:
      buffer = {k: np.empty((buffer_size,) + v.shape[1:], v.dtype) for k, v in block.items()}
    start = min(n, buffer_size - filled)
    for k, v in block.items():
      buffer[k][filled:filled + start] = v[:start]
    filled += start
    while start < n:
      if not len(drawn):
        drawn = rng.choice(buffer_size, size=draw_size, replace=False)
      take = min(len(drawn), n - start)
      slots, drawn = drawn[:take], drawn[take:]
      yield from assembler.add(buffer, slots)
      for k, v in block.items():
        buffer[k][slots] = v[start:start + take]
      start += take
  if filled:
    yield from assembler.add(buffer, rng.permutation(filled))


def _rebatch(blocks: Iterable[Batch], batch_size: int, drop_remainder: bool) -> Iterator[Batch]:
  """Blocks of any size -> batches of exactly `batch_size` rows with a 'mask' of real rows.

  Batches inside a block are views of it; only a batch that straddles two blocks is copied.
  """
  pending, have = [], 0
  for block in blocks:
    n = _num_rows(block)
    start = 0
    if have:
      start = min(n, batch_size - have)
      pending.append(_take(block, slice(0, start)))
      have += start
      if have < batch_size:
        continue
      yield _with_mask(_concat(pending), batch_size)
      pending, have = [], 0
    while start + batch_size <= n:
      yield _with_mask(_take(block, slice(start, start + batch_size)), batch_size)
      start += batch_size
    if start < n:
      pending, have = [_take(block, slice(start, n))], n - start
  if have and not drop_remainder:
    rest = _concat(pending)
    batch = {k: np.zeros((batch_size,) + v.shape[1:], v.dtype) for k, v in rest.items()}
    for k, v in rest.items():
      batch[k][:have] = v
    yield _with_mask(batch, have)


def _with_mask(batch: Batch, real_rows: int) -> Batch:
  mask = np.zeros(_num_rows(batch), np.float32)
  mask[:real_rows] = 1.0
  return dict(batch, mask=mask)


def batches(paths: Paths, spec: feature_spec_lib.FeatureSpec, batch_size: int, *,
            shuffle_buffer: int = 0, seed: int = 0, num_epochs: Optional[int] = 1,
            drop_remainder: bool = True, skip_bad_rows: bool = False,
            stats: Optional[ParseStats] = None, process_index: int = 0,
            process_count: int = 1, chunk_rows: int = 8192, num_workers: int = 0,
            line_ranges: Optional[Sequence[Optional[LineRange]]] = None) -> Iterator[Batch]:
  """Batches of exactly `batch_size` rows: the parsed layout plus 'mask' f32[B] (1 = real row).

  As DeepRec's `shuffle(buffer, seed) -> repeat(num_epochs) -> batch`: each epoch is shuffled
  through a buffer of `shuffle_buffer` rows (0 keeps file order) with its own seeded order, and
  batches run across epoch boundaries. `num_epochs=None` repeats forever. With
  `drop_remainder=False` the last partial batch is padded with zero rows whose mask is 0.
  `stats` counts the first epoch's lines only. `chunk_rows`, `num_workers`, `line_ranges` and
  the sharding arguments are iter_row_chunks'.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be positive or None (forever), got {num_epochs}')
  if shuffle_buffer < 0:
    raise ValueError(f'shuffle_buffer must be >= 0, got {shuffle_buffer}')
  files = expand_paths(paths)  # fail on a missing file now, not at the first next()

  def epoch_chunks(pool, counter, epoch_stats):
    for chunk in _row_chunks(files, spec, chunk_rows, skip_bad_rows, epoch_stats, process_index,
                             process_count, pool, line_ranges):
      counter[0] += _num_rows(chunk)
      yield chunk

  def epochs(pool):
    # One assembler for all epochs: batches run on across epoch ends without extra copies.
    assembler = _BatchAssembler(batch_size)
    for epoch in itertools.count() if num_epochs is None else range(num_epochs):
      rows = [0]
      # Later epochs read the same lines again: counting them would count each bad row (and
      # every other figure) once per epoch, unlike the row cache, which parses a file once.
      blocks = epoch_chunks(pool, rows, stats if epoch == 0 else None)
      if shuffle_buffer:
        rng = np.random.default_rng([seed, process_index, epoch])
        blocks = _shuffle_rows(blocks, shuffle_buffer, rng, assembler)
      yield from blocks
      if not rows[0] and num_epochs is None:
        # Without this an all-bad (or too small to share) input would spin forever.
        raise DataError(f'{", ".join(files)}: no rows to read for process {process_index}')
    yield from assembler.rest()

  def all_epochs():
    if num_workers <= 0:
      yield from epochs(None)
      return
    with contextlib.closing(_WorkerPool(spec, num_workers)) as pool:  # one for all epochs
      yield from epochs(pool)

  return _rebatch(all_epochs(), batch_size, drop_remainder)


# ------------------------------------------------------------------------------------------------
# Overlapping input preparation with compute.

class _Failure:
  """An exception of the producer thread, on its way to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def prefetch(iterator: Iterable[Any], size: int = 2,
             transform: Optional[Callable[[Any], Any]] = None) -> Iterator[Any]:
  """Runs `iterator` (then `transform`, e.g. a device_put) in a background thread, `size` ahead.

  An exception in the producer is raised again, the same object, at the consumer's next(). The
  thread is a daemon and stops once the consumer is closed or garbage-collected, so an abandoned
  prefetch neither leaks a busy thread nor holds up interpreter exit.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be positive, got {size}')
  items = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    source = iter(iterator)
    try:
      for item in source:
        if transform is not None:
          item = transform(item)
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      put(_Failure(e))
    finally:
      close = getattr(source, 'close', None)
      if close is not None and stop.is_set():
        close()

  def consume():
    try:
      while True:
        item = items.get()
        if item is _END:
          return
        if isinstance(item, _Failure):
          raise item.error
        yield item
    finally:
      stop.set()

  thread = threading.Thread(target=produce, name='input-prefetch', daemon=True)
  consumer = consume()
  weakref.finalize(consumer, stop.set)
  thread.start()
  return consumer
