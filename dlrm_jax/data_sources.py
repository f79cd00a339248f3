"""Which files a run reads, and how: one place that turns a config into batch iterators.

Files. An empty `data_location` means the embedded default: planted data of the spec's format
is generated under `output_dir` (reused when an identical data set is already there), together
with its oracle AUC and logloss, so a run needs no download and knows its best possible score.
Otherwise `train_files` / `eval_files` (comma-separated names or glob patterns inside
data_location; '' = train.csv / eval.csv for ELM, train.txt / eval.txt for Criteo) name the
files, each optionally gzip'd (`day_0` finds `day_0.gz` too). With `split_parts = n > 0` the
train files hold everything: each is cut by line into n equal parts, the last `eval_parts` of
them are evaluated on and the rest trained on (Criteo Kaggle: train.txt is 7 days, the 7th is
evaluated on; the Facebook reference evaluates only its first half, its test set).

Reading. With `use_cache` (the default) each source is parsed once into a row cache
(`row_cache`, under `cache_dir` or `<data dir>/dlrm_cache`) and every epoch and evaluation reads
the cache; `resolve` builds the train caches (it needs their row counts), the eval caches are
built when the first eval batch is read (a training run reads it before its first step, to
compile the evaluation). Otherwise the CSV is parsed every epoch (`num_workers`
processes). With `tfds_data_dir` set, the TFDS array_record data sets of `tfds_builders` are
read instead. `python -m dlrm_jax.data_sources --config=...` builds a config's caches ahead.

  data = data_sources.resolve(config, spec)                       # files, checked; train rows
  train = data_sources.train_batches(config, spec, data, num_steps=n, start_step=s, stats=st)
  evals = data_sources.eval_batches(config, spec, data, stats=st)

Multi-host. Each process reads only its share of the rows, and every process yields the same
number of batches: `num_steps` for training (the stream repeats), and, for evaluation, enough
for the largest possible share, padded with all-masked batches.
"""

import dataclasses
import functools
import glob
import itertools
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from dlrm_jax import cli
from dlrm_jax import datagen
from dlrm_jax import feature_spec as fs
from dlrm_jax import input_pipeline
from dlrm_jax import row_cache
from dlrm_jax import torchrec_npy

Batch = Dict[str, np.ndarray]
Source = row_cache.Source

# The file names each format is read from inside data_location, unless the config names others.
FILE_NAMES = {'elm': ('train.csv', 'eval.csv'), 'criteo': ('train.txt', 'eval.txt')}

WHERE_TO_GET = {
    'elm': ('The Ali ELM (Ele.me) data set is on Alibaba Tianchi: '
            'https://tianchi.aliyun.com/dataset/dataDetail?dataId=131047 ; concatenate the day '
            'files into train.csv (days 1-7) and eval.csv (day 8).'),
    'criteo': ('Criteo Kaggle (train.txt) and Criteo 1TB (day_0 .. day_23, gzip\'d or not) come '
               'from https://ailab.criteo.com/ressources/ ; configs/criteo_kaggle.py and '
               'configs/criteo_1tb.py say which files they read.'),
}

# Files at least this large are parsed by worker processes when num_workers is -1 (auto).
_AUTO_WORKERS_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class DataFiles:
  """The files of a run. train_path / eval_path: the first train / eval file (for messages);
  train_rows: lines of all train sources (every process's), 0 when not asked for; the sources
  say exactly which lines of which files are read."""
  train_path: str
  eval_path: str
  train_rows: int
  oracle: Dict[str, float]
  train_sources: Tuple[Source, ...] = ()
  eval_sources: Tuple[Source, ...] = ()
  directory: str = ''  # data_location, or the planted data's directory
  # The run's shared lock on planted data (datagen.ReadersLock): close() when the run ends.
  readers: Any = dataclasses.field(default=None, compare=False, repr=False)

  def close(self) -> None:
    if self.readers is not None:
      self.readers.close()


def match_files(directory: str, names: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(files, missing paths) of file names or glob patterns inside `directory`: a name is the
  file, or the file with `.gz` added; a pattern is the files it matches, sorted."""
  files, missing = [], []
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      files.append(path)
    elif os.path.isfile(path + '.gz'):
      files.append(path + '.gz')
    else:
      # Only the name is a pattern: a directory named like one ('data[1]') matched its siblings.
      matched = sorted(p for p in glob.glob(os.path.join(glob.escape(directory), name))
                       if os.path.isfile(p)) if glob.has_magic(name) else []
      if matched:
        files.extend(matched)
      else:
        missing.append(path)
  return files, missing


def _find(directory: str, names: str, spec_name: str, default: str,
          planted: bool = False) -> List[str]:
  """Files named by a comma-separated list of names / patterns inside `directory` (the planted
  data set's with `planted`)."""
  files, missing = match_files(
      directory, [n.strip() for n in (names or default).split(',') if n.strip()])
  if missing and planted:
    # A config for a data set of other file names (criteo_1tb.py's days) on planted data.
    raise FileNotFoundError(
        f"{directory} (the planted data set: data_location is empty) has "
        f"{' and '.join(FILE_NAMES[spec_name])}, not {', '.join(map(os.path.basename, missing))}: "
        'add --config.train_files= --config.eval_files= to train and evaluate on its files, or '
        'set data_location to the real files.')
  if missing and os.path.isfile(directory):
    raise NotADirectoryError(
        f'data_location {directory} is a file: set it to the directory that holds the data '
        f"({' and '.join(FILE_NAMES[spec_name])}, or the files train_files and eval_files name)")
  if missing:
    # A stand-in goes beside files that are there, never over them.
    stand_in = (directory if not (os.path.isdir(directory) and os.listdir(directory))
                else os.path.join(directory, 'planted'))
    # Stand-ins have the default file names, not those this config may name (1TB's days).
    renamed = (f" ({' and '.join(FILE_NAMES[spec_name])}: add --config.train_files= "
               '--config.eval_files=)') if names else ''
    raise FileNotFoundError(
        f"missing {', '.join(missing)}. {WHERE_TO_GET[spec_name]} To train on a stand-in of the "
        f'same format, run: python -m dlrm_jax.datagen {spec_name} --out_dir {stand_in} '
        '--train_rows 1000000 --eval_rows 200000 --seed 1 (and set data_location to it), or '
        f'leave data_location empty to use the embedded planted data{renamed}.')
  return files


def _process(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  return process_index, process_count


PLANTED_SIZES = ('train_rows', 'eval_rows', 'seed')


def planted_arguments(planted: Dict[str, Any], kind: str) -> Dict[str, Any]:
  """datagen.ensure_planted_data's keyword arguments from config.planted: its fields that are
  set (None: the generator's default) and describe `kind`'s world. config.planted describes the
  ELM world (configs/default.py); a Criteo world takes the sizes, the seed and the fields its
  model shares (target_ctr, latent_dim, interaction_weight, linear_weight) and its own zipf."""
  world = {f.name for f in dataclasses.fields(datagen.PLANTED_MODELS[kind])} | set(PLANTED_SIZES)
  return {k: v for k, v in planted.items() if k in world and v is not None}


def planted_parameters(planted: Dict[str, Any], kind: str) -> Optional[Dict[str, Any]]:
  """The sizes, seed and model fields (defaults included) of the planted data set config.planted
  makes: what decides its rows. None when `planted` cannot say (no sizes or seed, or a value
  the generator refuses)."""
  arguments = planted_arguments(planted, kind)
  try:
    model = datagen.planted_model(kind, **{k: v for k, v in arguments.items()
                                           if k not in PLANTED_SIZES})
    recorded = datagen.recorded_parameters(kind, *(arguments[k] for k in PLANTED_SIZES), False,
                                           model)
  except (KeyError, TypeError, ValueError):
    return None
  return {**{k: recorded[k] for k in PLANTED_SIZES}, **recorded['planted']}


def _planted_data(config, spec: fs.FeatureSpec, directory: str) -> Tuple[Dict[str, Any], Any]:
  """datagen.ensure_and_hold, with the processes of a multi-process run taking turns.

  Process 0 writes the files while the others wait for it; they then reuse them (on a shared
  disk) or write the same files to their own. Writing at once, two processes on one disk would
  replace each other's files while the other is caching them.
  """
  planted = config.planted.to_dict()
  arguments = planted_arguments(planted, spec.name)
  unused = sorted(k for k, v in planted.items() if v is not None and k not in arguments)
  if unused:
    logging.info('planted %s data: config.planted.%s do not describe its world and are not '
                 'used', spec.name, ', '.join(unused))
  ensure = functools.partial(datagen.ensure_and_hold, directory, spec.name, **arguments)
  import jax  # pylint: disable=g-import-not-at-top
  if not (jax.distributed.is_initialized() and jax.process_count() > 1):
    return ensure()
  first, nothing = jax.process_index() == 0, lambda: None
  held = []  # (oracle, readers lock) once ensure() has run here

  def ensure_here():
    held.append(ensure())
  # Agreements in the place of a barrier: process 0's error (PlantedDataInUse, a full disk)
  # stops the others where they waited for it, and theirs stop process 0 before its first
  # collective on the data.
  try:
    agreeing(f'writing the planted data in {directory}', ensure_here if first else nothing)
    agreeing(f'reading the planted data in {directory}', nothing if first else ensure_here)
  except BaseException:
    for _, readers in held:  # another process failed: the readers lock is not kept open
      if readers is not None:
        readers.close()
    raise
  return held[0]


def _evaluates_planted_eval_file(config, spec: fs.FeatureSpec, directory: str,
                                 planted: Dict[str, Any]) -> bool:
  """Whether the run's eval rows are the planted eval file, all of it: the rows its oracle
  figures are of. Not so with split_parts (the last parts of the train file) or with eval_files
  naming other files."""
  names = config.eval_files
  if int(config.split_parts):
    logging.info('planted data: evaluating parts of the train file, which oracle.json does not '
                 'score; results.json gets no oracle figures')
    return False
  try:
    paths = _find(directory, names, spec.name, FILE_NAMES[spec.name][1])
  except FileNotFoundError:
    return False  # resolve names the missing file
  if [os.path.realpath(p) for p in paths] == [os.path.realpath(planted['eval_path'])]:
    return True
  logging.info('planted data: eval_files=%r is not the planted eval file, which oracle.json '
               'scores; results.json gets no oracle figures', names)
  return False


def resolve(config, spec: fs.FeatureSpec, *, train: bool = True, need_train_files: bool = True,
            process_index: Optional[int] = None,
            process_count: Optional[int] = None) -> DataFiles:
  """The run's files, checked to exist before anything is read.

  With `train` the train rows are counted (from the caches' manifests with `use_cache`, building
  the caches first if needed, so the run's step count is known); `train=False` leaves
  train_rows 0 and reads nothing. `need_train_files=False` (eval mode) does not look for the
  train files at all unless `split_parts` cuts the eval rows out of them, so an evaluator needs
  only its eval file. Process index and count default to JAX's.
  """
  input_pipeline.refuse_while_a_process_starts('data_sources.resolve')
  train_name, eval_name = FILE_NAMES[spec.name]
  if config.data_location:
    directory = config.data_location
    # Planted data that datagen wrote there, complete as its oracle.json recorded it, has its
    # oracle figures too.
    written, held = datagen.read_complete(directory, spec.name), None
  else:
    directory = os.path.join(config.output_dir, f'planted_{spec.name}')
    written, held = _planted_data(config, spec, directory)
  try:
    oracle = ({k: v for k, v in written.items() if k in ('oracle_auc', 'oracle_logloss')}
              if written and _evaluates_planted_eval_file(config, spec, directory, written)
              else {})
    if config.tfds_data_dir:
      # The TFDS data set (prepared from `directory` if it is not yet) is the data.
      from dlrm_jax import tfds_builders  # pylint: disable=g-import-not-at-top
      train_rows = agreeing('preparing the TFDS data set', tfds_builders.split_rows, config,
                            spec, directory, 'train') if train else 0
      return DataFiles(config.tfds_data_dir, config.tfds_data_dir, train_rows, oracle,
                       directory=directory, readers=held)
    planted = not config.data_location
    parts = int(config.split_parts)
    train_files = eval_files = ()
    if need_train_files or train or parts:
      train_files = agreeing('finding the train files', _find, directory, config.train_files,
                             spec.name, train_name, planted)
    if not parts and (not config.no_eval or config.mode == 'eval'):  # eval mode evaluates
      eval_files = agreeing('finding the eval files', _find, directory, config.eval_files,
                            spec.name, eval_name, planted)
    torchrec_npy.check_one_encoding(list(train_files) + list(eval_files))
    if parts:
      eval_parts = int(config.eval_parts)
      if not 0 < eval_parts < parts:
        raise ValueError(f'eval_parts={eval_parts} must be in [1, split_parts={parts})')
      train_sources = tuple(Source(p, (0, parts - eval_parts, parts)) for p in train_files)
      eval_sources = tuple(Source(p, (parts - eval_parts, parts, parts)) for p in train_files)
    else:
      train_sources = tuple(Source(p) for p in train_files)
      eval_sources = tuple(Source(p) for p in eval_files)
    train_rows = 0
    if train:
      train_rows = sum(source_lines(config, spec, train_sources, process_index, process_count))
    eval_path = eval_sources[0].path if eval_sources else os.path.join(directory, eval_name)
    train_path = train_files[0] if train_files else ''
    return DataFiles(train_path, eval_path, train_rows, oracle, train_sources, eval_sources,
                     directory, readers=held)
  except BaseException:
    if held is not None:
      held.close()
    raise


def source_lines(config, spec: fs.FeatureSpec, sources: Sequence[Source],
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> List[int]:
  """Lines of each source (all processes' together): from the caches, or counted."""
  if config.use_cache:
    return [cache.manifest['lines'] for cache, _, _ in
            _open_caches(config, spec, sources, None, process_index, process_count)]
  def count():  # no collective inside: a file unreadable on one host stops every process
    counts = []
    for source in sources:
      start, stop = source.line_range()
      counts.append((stop if stop is not None else input_pipeline.count_rows(source.path))
                    - start)
    return counts
  return agreeing('counting the rows', count)


def parse_workers(config, paths: Sequence[str]) -> int:
  """CSV parse processes for `paths` by config.num_workers."""
  return workers_for(int(config.num_workers), paths)


def workers_for(num_workers: int, paths: Sequence[str]) -> int:
  """`num_workers` parse processes, or with -1 one per core (at most 8) when a file of `paths`
  is large enough to repay starting them."""
  if num_workers >= 0:
    return num_workers
  # A TorchRec triple is not parsed: workers would only wait.
  big = any(os.path.getsize(p) >= _AUTO_WORKERS_BYTES for p in paths
            if not torchrec_npy.is_npy_source(p))
  return min(os.cpu_count() or 1, 8) if big and (os.cpu_count() or 1) > 1 else 0


def _open_caches(config, spec, sources, stats, process_index, process_count):
  """(cache, first row, stop row) of this process for each source, built where needed.

  A cache that another process is building is taken last: runs (or `python -m
  dlrm_jax.data_sources`) started together on one machine, or on hosts sharing the cache
  directory, build different files instead of queueing for the same one.
  """
  index, count = _process(process_index, process_count)
  root = config.cache_dir
  use_full = [count > 1 and row_cache.has_full_cache(s, spec, root) for s in sources]
  if count > 1:
    use_full = _on_every_process(use_full)

  def open_one(i, wait):
    return row_cache.open_or_build(
        sources[i], spec, cache_root=root, skip_bad_rows=config.skip_bad_rows,
        num_workers=parse_workers(config, [sources[i].path]), process_index=index,
        process_count=count, wait=wait, use_full_cache=use_full[i])

  error = None
  try:
    opened = [open_one(i, wait=False) for i in range(len(sources))]
    opened = [o if o is not None else open_one(i, wait=True) for i, o in enumerate(opened)]
    for i, (cache, _, _) in enumerate(opened):
      if use_full[i] and cache.manifest['share'] != [0, 1]:
        # It went stale since every process agreed to read it: this process now reads its own
        # share while the others read slices.
        raise RuntimeError(f'the row cache of {sources[i].describe()} changed while the '
                           'processes opened it (rebuilt, or its source file changed): run again')
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if count > 1:
    fail_together(error, 'reading ' + ', '.join(s.describe() for s in sources))
  elif error is not None:
    raise error
  if stats is not None:
    for (cache, _, _), full in zip(opened, use_full):
      # A cache of the whole file holds every process's counts: they are process 0's to report,
      # so that the run's totals (train.global_parse_stats) add up.
      if not full or index == 0:
        row_cache.add_manifest_stats(stats, cache.manifest)
  return opened


def fail_together(error: Optional[BaseException], what: str,
                  error_type: Optional[type] = None) -> None:
  """Raises `error` here and an `error_type` (a DataError by default) on every other process of
  a multi-process run, naming the processes that failed and the first one's error.

  A bad row is often in one process's share only: that process would raise and wait in JAX's
  shutdown barrier while the others waited in their next collective, both for minutes, and the
  others' logs would only say that the barrier failed. Every process calls this at the same
  point, error or not: it is one collective (each process's error text, at most
  _ERROR_BYTES bytes, gathered). Without jax.distributed (processes simulated in one
  interpreter) it raises `error` alone.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    local = np.zeros(1 + _ERROR_BYTES, np.uint8)  # [0]: failed; then the error's text
    if error is not None:
      text = f'{type(error).__name__}: {error}'.encode('utf-8', 'replace')[:_ERROR_BYTES]
      local[0], local[1:1 + len(text)] = 1, np.frombuffer(text, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)
    failed = np.flatnonzero(every[:, 0])
    if failed.size and error is None:
      first = bytes(every[failed[0], 1:]).rstrip(b'\0').decode('utf-8', 'ignore')
      error = (error_type or input_pipeline.DataError)(
          f'{what} failed on process {", ".join(map(str, failed))}: its log says why '
          f'(process {failed[0]}: {first})')
    if error is not None:
      raise raised_together(error)
  if error is not None:
    raise error


def raised_together(error: BaseException) -> BaseException:
  """`error`, marked as one that every process of a multi-process run raises at the same point
  (from values they share): train.stopping_together lets all of them meet in JAX's shutdown
  barrier, as for an error no process meets alone."""
  error.failed_together = True
  return error


_ERROR_BYTES = 1024


class OtherProcessFailed(RuntimeError):
  """Another process of a multi-process run failed at a step every process takes together."""


def agreeing(what: str, fun, *args, **kwargs):
  """fun(*args, **kwargs), failing on every process of a multi-process run when it fails on
  any: for a step that one process can fail alone (its files, disk, locks) before a collective
  the others would wait in for JAX's shutdown timeout (5 minutes). Every process calls it at
  the same point."""
  error = result = None
  try:
    result = fun(*args, **kwargs)
  except BaseException as e:  # pylint: disable=broad-except
    error = e  # a Ctrl-C too: the others would wait for this process in the gather
  fail_together(error, what, OtherProcessFailed)
  return result


def _on_every_process(flags: List[bool]) -> List[bool]:
  """`flags`, each true only where it is true on every process of a multi-process run.

  A process reads a slice of a full cache where it finds one, else builds its own share of the
  lines. Hosts with a cache_dir each may find different caches, and processes that chose
  differently would read some rows twice and others never: the choice is made for all at once.
  Without jax.distributed (processes simulated in one interpreter) `flags` stand as they are.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not (jax.distributed.is_initialized() and jax.process_count() > 1):
    return flags
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # The counts first: gathering lists of different lengths would hang, not fail.
  counts = np.asarray(multihost_utils.process_allgather(np.int32(len(flags)))).ravel().tolist()
  if len(set(counts)) > 1:
    raise ValueError(f'the processes found different numbers of input files ({counts}, by '
                     'process): every host must see the same files')
  if not flags:
    return flags
  every = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
  return every.reshape(-1, len(flags)).min(axis=0).astype(bool).tolist()


def _row_reader(config, spec, data, sources, stats, process_index, process_count, split):
  """A RowReader over this process's rows of `sources` (row caches or the TFDS split)."""
  index, count = _process(process_index, process_count)
  if config.tfds_data_dir:
    from dlrm_jax import tfds_builders  # pylint: disable=g-import-not-at-top
    return tfds_builders.row_reader(config, spec, data.directory, split, process_index=index,
                                    process_count=count, stats=stats)
  block_rows = int(config.cache_block_rows)
  segments = [row_cache.cache_segment(cache, start, stop, block_rows)
              for cache, start, stop in _open_caches(config, spec, sources, stats, index, count)]
  return row_cache.RowReader(segments, spec, name=', '.join(s.describe() for s in sources))


def _csv_files(sources: Sequence[Source]):
  return [s.path for s in sources], [s.line_range() for s in sources]


def _exactly(batches: Iterator[Batch], num_batches: int, spec: fs.FeatureSpec,
             batch_size: int) -> Iterator[Batch]:
  """`batches` cut or padded (with all-masked batches) to exactly `num_batches`."""
  produced = 0
  try:
    for batch in itertools.islice(batches, num_batches):
      produced += 1
      yield batch
  finally:
    batches.close()
  for _ in range(num_batches - produced):
    yield row_cache.empty_batch(spec, batch_size)


def train_batches(config, spec: fs.FeatureSpec, data: DataFiles, *, num_steps: int,
                  start_step: int = 0, stats: Optional[input_pipeline.ParseStats] = None,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None, compact: bool = False) -> Iterator[Batch]:
  """Exactly `num_steps - start_step` training batches of this process's rows.

  Each holds `batch_size // process_count` rows, shuffled as `shuffle_buffer` and `seed` say;
  the data repeats as long as needed. `start_step` continues a resumed run's order (the cache
  skips the rows without reading them; the CSV path parses and drops them). With `compact`, the
  cache and TFDS paths give batches in row_cache.compact_batch's layout, which
  models.UniqueRows reads without expanding every row to its padded slots.
  """
  index, count = _process(process_index, process_count)
  batch_size = config.batch_size // count
  if config.use_cache or config.tfds_data_dir:
    reader = _row_reader(config, spec, data, data.train_sources, stats, index, count, 'train')
    return reader.batches(batch_size, shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                          num_epochs=None, first_batch=start_step, num_batches=num_steps,
                          process_index=index, compact=compact)
  paths, ranges = _csv_files(data.train_sources)
  batches = input_pipeline.batches(
      paths, spec, batch_size, shuffle_buffer=config.shuffle_buffer, seed=config.seed,
      num_epochs=None, drop_remainder=True, skip_bad_rows=config.skip_bad_rows, stats=stats,
      process_index=index, process_count=count,
      num_workers=parse_workers(config, paths), line_ranges=ranges)
  return _closing_slice(batches, start_step, num_steps)


def _closing_slice(batches, start: int, stop: int) -> Iterator[Batch]:
  """islice that closes its source when it is closed (so worker processes end with it)."""
  try:
    yield from itertools.islice(batches, start, stop)
  finally:
    batches.close()


def eval_batches(config, spec: fs.FeatureSpec, data: DataFiles, *,
                 stats: Optional[input_pipeline.ParseStats] = None,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None, compact: bool = False) -> Iterator[Batch]:
  """Every eval row of this process once, in file order, in batches of this process's share of
  `eval_batch_size` (global, as `batch_size`; the last padded, mask 0), as many batches on every
  process. `compact` as for train_batches."""
  index, count = _process(process_index, process_count)
  batch_size = config.eval_batch_size // count
  if config.tfds_data_dir:
    reader = _row_reader(config, spec, data, data.eval_sources, stats, index, count, 'eval')
    return reader.batches(batch_size, num_epochs=1, drop_remainder=False,
                          num_batches=max(1, -(-reader.max_share_rows // batch_size)),
                          compact=compact)
  lines = source_lines(config, spec, data.eval_sources, index, count)
  num_batches = row_cache.max_share_batches(lines, count, batch_size)
  if config.use_cache:
    reader = _row_reader(config, spec, data, data.eval_sources, stats, index, count, 'eval')
    return reader.batches(batch_size, num_epochs=1, drop_remainder=False,
                          num_batches=num_batches, compact=compact)
  paths, ranges = _csv_files(data.eval_sources)
  batches = input_pipeline.batches(
      paths, spec, batch_size, drop_remainder=False, skip_bad_rows=config.skip_bad_rows,
      stats=stats, process_index=index, process_count=count,
      num_workers=parse_workers(config, paths), line_ranges=ranges)
  return _exactly(batches, num_batches, spec, batch_size)


def prepare(config, spec: fs.FeatureSpec, *, process_index: int = 0,
            process_count: int = 1) -> Dict[str, object]:
  """Builds (or checks) the caches of a config's train and eval data; returns their manifests.

  `python -m dlrm_jax.data_sources --config=...` runs this, e.g. to cache once before many runs;
  with process_count 1 the cache holds every row, and any number of hosts can share it. With
  `tfds_data_dir` it prepares the TFDS data set instead and returns its splits' row counts.
  """
  data = resolve(config, spec, train=False, process_index=process_index,
                 process_count=process_count)
  if config.tfds_data_dir:
    from dlrm_jax import tfds_builders  # pylint: disable=g-import-not-at-top
    return {f'{config.tfds_data_dir} {split}':
            {'rows': tfds_builders.split_rows(config, spec, data.directory, split)}
            for split in ('train', 'eval')}
  out = {}
  for source, (cache, _, _) in zip(
      data.train_sources + data.eval_sources,
      _open_caches(config, spec, data.train_sources + data.eval_sources, None, process_index,
                   process_count)):
    out[source.describe()] = {k: cache.manifest[k] for k in ('rows', 'lines', 'build_seconds')}
    out[source.describe()]['directory'] = cache.directory
    out[source.describe()]['bad_rows'] = cache.manifest['stats']['bad_rows']
  return out


def _main(argv):
  del argv
  import json  # pylint: disable=g-import-not-at-top
  config = cli.command_line_config(_FLAGS.config)
  logging.set_verbosity(logging.INFO)
  print(json.dumps(prepare(config, fs.from_config(config)), indent=1))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file('config', None, 'the run config whose data to cache')
  app.run(_main, flags_parser=cli.parse_flags)
