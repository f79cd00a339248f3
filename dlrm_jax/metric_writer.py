"""Where a run reports: TensorBoard scalars, log lines, a progress bar and a profiler timeline.

clu's writers need TensorFlow for TensorBoard files; tensorboardX writes the same event files
without it. Only process 0 writes, so multi-host runs produce one set of summaries.
"""

import functools
import glob
import importlib
import os
import struct
import sys
import time
from typing import Dict, Iterator, Optional, Set, Tuple

from absl import logging
import jax
import numpy as np
import tqdm

from dlrm_jax import metrics


# Optional packages tensorboardX imports whenever they are installed, and what it needs each for.
# Imported for nothing they cost memory in every run: torch ~190 MB (it accepts torch tensors),
# boto3 ~8 MB (S3 log directories), comet_ml (Comet logging, never used here).
_UNNEEDED_BY_TENSORBOARDX = {'torch': None, 'comet_ml': None, 'boto3': 's3://',
                             'google.cloud.storage': 'gs://'}


def _tensorboardx(module: str = 'tensorboardX', logdir: str = ''):
  """Imports a tensorboardX module without its optional imports that `logdir` does not need.

  A `None` entry in sys.modules makes `import torch` (say) raise ImportError, which tensorboardX
  handles as the package not being installed. Modules already imported are left alone, and an
  s3:// or gs:// `logdir` keeps the client it writes through.
  """
  blocked = [name for name, scheme in _UNNEEDED_BY_TENSORBOARDX.items()
             if name not in sys.modules and not (scheme and logdir.startswith(scheme))]
  for name in blocked:
    sys.modules[name] = None
  try:
    return importlib.import_module(module)
  finally:
    for name in blocked:
      del sys.modules[name]


@functools.lru_cache(maxsize=None)
def _tensorflow_bins() -> Tuple[float, ...]:
  """TensorBoard's default histogram edges (as tensorboardX's SummaryWriter builds them):
  +-1e-12 .. 1e20, 10% apart, and 0."""
  edges, v = [], 1e-12
  while v < 1e20:
    edges.append(v)
    v *= 1.1
  return tuple([-v for v in reversed(edges)] + [0.0] + edges)


class MetricWriter:
  """Scalars to TensorBoard event files under `workdir` and to the log.

  Events are written on the calling thread, so that `flush` puts on disk everything written
  before it (tensorboardX's SummaryWriter hands them to a thread through a queue, and its flush
  leaves what the thread has not taken yet). Each writer has a file of its own: tensorboardX
  names files by the second and host and opens them for writing, so a second run starting in the
  same second emptied the first one's file.
  """

  _FLUSH_SECS = 10  # a live TensorBoard lags by at most this, or one log call if rarer
  _opened = 0  # writers opened by this process, for unique file names

  def __init__(self, workdir: str, enabled: bool = True, start_step: Optional[int] = 0):
    """`start_step`: the step a resumed run restored (0 for a new run); None writes no restart
    marker (an evaluator's file, whose steps are the checkpoints it scored, in any order)."""
    self._enabled = enabled
    self._events = None
    self._workdir = workdir
    if enabled:
      self._summary = _tensorboardx('tensorboardX.summary', logdir=workdir)
      self._event_pb2 = _tensorboardx('tensorboardX.proto.event_pb2', logdir=workdir)
      _tensorboardx('tensorboardX.record_writer', logdir=workdir).directory_check(workdir)
      MetricWriter._opened += 1
      self._events = _tensorboardx('tensorboardX.event_file_writer', logdir=workdir).EventsWriter(
          os.path.join(workdir, 'events'), f'.{os.getpid()}.{MetricWriter._opened:04d}')
      # A restart marker, as TensorFlow's writers leave: TensorBoard then drops the earlier
      # files' points after the restored step (logged again by this run) instead of showing
      # both. A new run's (step 1) drops only those of an attempt that saved no checkpoint.
      if start_step is not None:
        self._events.write_event(self._event_pb2.Event(
            step=start_step + 1, wall_time=time.time(),
            session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))
      self._flushed = time.monotonic()

  def _write(self, step: int, summaries) -> None:
    for summary in summaries:
      self._events.write_event(self._event_pb2.Event(summary=summary, step=int(step),
                                                     wall_time=time.time()))
    if time.monotonic() - self._flushed > self._FLUSH_SECS:
      self.flush()

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self._enabled:
      return
    self._write(step, [self._summary.scalar(name, float(value))
                       for name, value in scalars.items()])
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_histograms(self, step: int, arrays: Dict[str, object]) -> None:
    if not self._enabled:
      return
    self._write(step, [self._summary.histogram(name, values, _tensorflow_bins())
                       for name, values in arrays.items()])

  def write_config(self, config) -> None:
    """The config as JSON beside the summaries, and as text in TensorBoard.

    A resumed run with other settings (more steps, another learning rate) appends the config.json
    it replaces to config_history.jsonl: each invocation's settings stay on record.
    """
    if not self._enabled:
      return
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = os.path.join(self._workdir, 'config.json')
    if os.path.exists(path):
      with open(path) as f:
        changed = f.read() != text
      if changed:
        metrics.archive_previous(path, os.path.join(self._workdir, 'config_history.jsonl'),
                                 'unreadable_config')
    metrics.write_text_atomic(path, text)
    self._write(0, [self._summary.text('config', '```\n' + text + '\n```')])

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()
      self._flushed = time.monotonic()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


class Timeline:
  """A jax.profiler trace of one step every `every` steps, as DeepRec's --timeline N
  (TensorFlow's ProfilerHook(save_steps=N)) records one step's timeline every N steps.

  The first traced step is `first_step`, so that compilation and warm-up stay out; each trace
  goes to workdir/timeline/step_<number of steps done after it>, a TensorBoard run of its own.
  `seconds` is the time starting and writing the traces took, to keep out of training rates.
  """

  def __init__(self, workdir: str, every: int, first_step: int):
    self.logdir = os.path.join(workdir, 'timeline')
    self._every = every
    self._first = first_step
    self._active = False
    self._enabled = every > 0 and jax.process_index() == 0
    self.seconds = 0.0

  def before_step(self, step: int) -> None:
    if (self._enabled and not self._active and step >= self._first
        and (step - self._first) % self._every == 0):
      start = time.perf_counter()
      try:
        jax.profiler.start_trace(os.path.join(self.logdir, f'step_{step + 1}'))
        self._active = True
      except RuntimeError as e:  # another trace is running (the user's, around the run)
        logging.warning('profiler timeline: step %d not traced: %s', step + 1, e)
      self.seconds += time.perf_counter() - start

  def after_step(self, step: int, result) -> None:
    if self._active:
      jax.block_until_ready(result)
      start = time.perf_counter()
      self.close()
      self.seconds += time.perf_counter() - start
      logging.info('profiler timeline of step %d written to %s', step + 1,
                   os.path.join(self.logdir, f'step_{step + 1}'))

  def close(self) -> None:
    """Stops a trace in progress; also when a step failed, or the profiler would stay on for
    the rest of the process and the next run's first trace would fail to start."""
    if self._active:
      self._active = False
      jax.profiler.stop_trace()


class _Progress:
  """A tqdm bar over steps showing loss and samples/s (silent when not on a terminal)."""

  def __init__(self, total: int, initial: int):
    self._bar = tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                          disable=None if jax.process_index() == 0 else True)
    self._step = initial

  def update(self, step: int, **values) -> None:
    self._bar.update(step - self._step)
    self._step = step
    self._bar.set_postfix({k: f'{v:.4g}' for k, v in values.items()}, refresh=False)

  def close(self) -> None:
    self._bar.close()


def progress_bar(total: int, initial: int = 0) -> _Progress:
  return _Progress(total, initial)


# Reading the event files back (for plots and tests; the `tensorboard` package is not needed).

def _records(path: str) -> Iterator[bytes]:
  """The payloads of a TFRecord file: u64 length, u32 crc, payload, u32 crc, repeated."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      length, = struct.unpack('<Q', header[:8])
      payload = f.read(length)
      if len(payload) < length or len(f.read(4)) < 4:
        return  # a run killed mid-write leaves a truncated last record
      yield payload


def _scalar_events(workdir: str) -> Iterator[Tuple[str, int, float, float]]:
  event_pb2 = _tensorboardx('tensorboardX.proto.event_pb2')
  for path in sorted(glob.glob(os.path.join(glob.escape(workdir), 'events.out.tfevents.*'))):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        kind = value.WhichOneof('value')
        if kind == 'simple_value':
          yield value.tag, event.step, event.wall_time, value.simple_value
        elif kind == 'tensor' and value.tensor.float_val:
          yield value.tag, event.step, event.wall_time, value.tensor.float_val[0]


def read_scalars(workdir: str, tag: str) -> Tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `tag` over every event file in `workdir`, by step.

  A resumed run appends a new event file; where two files hold the same step the later write
  wins, so a curve never shows both the interrupted and the resumed value.
  """
  latest = {}
  for name, step, wall_time, value in _scalar_events(workdir):
    if name == tag and (step not in latest or wall_time >= latest[step][0]):
      latest[step] = (wall_time, value)
  steps = np.asarray(sorted(latest), np.int64)
  return steps, np.asarray([latest[s][1] for s in steps], np.float64)


def read_scalar_tags(workdir: str) -> Set[str]:
  return {name for name, _, _, _ in _scalar_events(workdir)}
