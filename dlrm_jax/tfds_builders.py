"""TFDS builders for the ELM and Criteo files: parsed rows, 512 to an array_record record.

  spec = feature_spec.from_config(run_config)
  builder = tfds_builders.ElmBlocks(config=tfds_builders.config_for(run_config, spec), data_dir=D)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=M))
  source = tfds.data_source('elm_blocks', data_dir=D, builder_kwargs={'config': ...})

or, from a run config (what the trainer does when `config.tfds_data_dir` is set):

  python -m dlrm_jax.main --config=configs/criteo_kaggle.py --config.tfds_data_dir=/data/tfds

Neither writing nor reading needs TensorFlow: the records are written as array_record and read
with `tfds.data_source` (random access, no tf.data). A record is not one row (one row per record
reads at ~2k rows/s through TFDS's per-record decoding) but one block of `BLOCK_ROWS` rows in
the row cache's compact layout (`row_cache.encode_block`): reading a block costs one record
lookup, so blocks read at millions of rows per second, and `row_cache.RowReader` shuffles and
batches them exactly as it does the cache (seeded block order, shuffled windows). The builders
are ShardBasedBuilders: each split is parsed once, in file order, and written SHARD_BLOCKS
records to a shard, so a build's memory is a shard's, whatever the split's size.

The rows are parsed by `input_pipeline` as the trainer parses them, so a builder config is tied
to a feature spec (hash buckets, max_list_len, Criteo table sizes): `config_for` names the
config after the spec's parse fingerprint, so data for another spec is another data set, built
beside the first.
Manual download: the files are not downloadable from here; `MANUAL_DOWNLOAD_INSTRUCTIONS` say
where to put them. A data set records the size and modification time of each file it was built
from; when a file of that name in the manual directory differs from it (replaced, or another
directory's file), reading it is refused, naming the file: TFDS does not rebuild a prepared data
set, so delete its directory to rebuild it. Source files deleted after the build are fine.
"""

import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from dlrm_jax import data_sources
from dlrm_jax import feature_spec as fs
from dlrm_jax import input_pipeline
from dlrm_jax import row_cache

BLOCK_ROWS = 512


@dataclasses.dataclass(eq=False)
class BlocksConfig(tfds.core.BuilderConfig):
  """Which files make each split, and the spec their rows are parsed with.

  train_files / eval_files: names (or glob patterns) inside the manual directory; a name also
  finds its '.gz'. split_parts > 0: the train files hold everything, cut by line into that many
  parts, the last eval_parts of them being the eval split (Criteo Kaggle: 7 and 1).
  """
  spec: Optional[fs.FeatureSpec] = dataclasses.field(default=None, repr=False)
  train_files: Tuple[str, ...] = ()
  eval_files: Tuple[str, ...] = ()
  split_parts: int = 0
  eval_parts: int = 1
  skip_bad_rows: bool = False
  num_workers: int = -1


def _files(directory: str, names: Sequence[str]) -> List[str]:
  files, missing = data_sources.match_files(directory, names)
  if missing:
    raise FileNotFoundError(f"{', '.join(missing)} missing from the manual directory {directory}")
  return files


# Blocks per array_record shard: TFDS's shard writer holds a shard's examples until it is written
# (~100 MB of Criteo's blocks, ~250 MB of ELM's). GeneratorBasedBuilder's writer held a whole
# split, and past 1 GB spilled it through tf.io.gfile, which needs TensorFlow.
SHARD_BLOCKS = 1024


class _Blocks(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Rows of a DLRM data set, parsed, BLOCK_ROWS to a record, in file order."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Blocks of 512 parsed rows in the row cache layout (format 1).'}
  HOMEPAGE = ''

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            # row_cache.encode_block of up to BLOCK_ROWS rows.
            'block': tfds.features.Tensor(shape=(), dtype=np.object_),
            'rows': tfds.features.Scalar(dtype=np.int32),
        }),
        # File order is kept; the reader shuffles blocks and rows with the run's seed.
        disable_shuffling=True,
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(),
    )

  def _sources(self, manual_dir: str) -> Dict[str, List[row_cache.Source]]:
    config = self.builder_config
    train = _files(manual_dir, config.train_files)
    if config.split_parts:
      n, e = config.split_parts, config.eval_parts
      return {'train': [row_cache.Source(p, (0, n - e, n)) for p in train],
              'eval': [row_cache.Source(p, (n - e, n, n)) for p in train]}
    return {'train': [row_cache.Source(p) for p in train],
            'eval': [row_cache.Source(p) for p in _files(manual_dir, config.eval_files)]}

  def _shard_iterators_per_split(self, dl_manager):
    """Each split's blocks from one parse of its files, cut into shards of SHARD_BLOCKS.

    The shards are written one after another (no Beam), each taking the next blocks of the
    split's one generator, so every block but the split's last holds BLOCK_ROWS rows. Their
    number is fixed before parsing, from the lines the files' sizes suggest, with a quarter and a
    shard to spare: a gzip file's estimate can be low (by 19% for one whose end compresses
    better), and the last shard takes what is left, held in memory. Shards left empty are
    skipped when read.
    """
    self._built = {}
    shards = {}
    for split, sources in self._sources(os.fspath(dl_manager.manual_dir)).items():
      stats = input_pipeline.ParseStats()
      self._built[split] = (sources, stats)
      lines = sum(_estimated_lines(s) for s in sources)
      count = -(-lines * 5 // (4 * SHARD_BLOCKS * BLOCK_ROWS)) + 1
      blocks = self._blocks(sources, stats)
      shards[split] = [functools.partial(itertools.islice, blocks,
                                         SHARD_BLOCKS if i < count - 1 else None)
                       for i in range(count)]
    return shards

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    for split, (sources, stats) in self._built.items():
      if not stats.rows:
        # Raised before TFDS moves the data set into place: a split without a record would be
        # kept, and every later open of it fail (TFDS never rebuilds a prepared data set).
        where = ', '.join(s.describe() for s in sources)
        if stats.bad_rows:
          raise row_cache.bad_rows_error(stats.as_dict(), where, sources[0].path,
                                         f'; the {split} split has no good row left')
        raise input_pipeline.DataError(f'{where}: no rows for the {split} split', sources[0].path)
      self.info.metadata[f'{split}_rows'] = stats.rows
      self.info.metadata[f'{split}_lines'] = stats.source_lines
      self.info.metadata[f'{split}_stats'] = stats.as_dict()
      self.info.metadata[f'{split}_sources'] = [row_cache.file_identity(s.path) for s in sources]
    self.info.metadata['spec_fingerprint'] = row_cache.parse_fingerprint(self.builder_config.spec)

  def _blocks(self, sources: Sequence[row_cache.Source],
              stats: input_pipeline.ParseStats) -> Iterator[Tuple[int, Dict]]:
    """(key, record) of the sources' rows, BLOCK_ROWS to a record but the last."""
    config = self.builder_config
    spec = config.spec
    pending: List[row_cache.Rows] = []
    have = 0
    key = 0
    # -1: one per core for large files, as a run's own cache build decides.
    workers = data_sources.workers_for(config.num_workers, [s.path for s in sources])
    for source in sources:
      chunks = input_pipeline.iter_row_chunks(
          source.path, spec, skip_bad_rows=config.skip_bad_rows, stats=stats,
          num_workers=workers, line_ranges=[source.line_range()],
          postprocess=functools.partial(row_cache.compact, spec=spec))
      for rows in chunks:
        pending.append(rows)
        have += len(rows)
        if have < BLOCK_ROWS:
          continue
        rows = row_cache.concat(pending)
        full = len(rows) // BLOCK_ROWS * BLOCK_ROWS
        starts = row_cache.row_starts(rows)
        for first in range(0, full, BLOCK_ROWS):
          yield key, _record(rows, starts, first, first + BLOCK_ROWS)
          key += 1
        pending = [_slice(rows, starts, full, len(rows))] if full < len(rows) else []
        have = len(rows) - full
    if have:
      rows = row_cache.concat(pending)
      yield key, _record(rows, row_cache.row_starts(rows), 0, len(rows))


def _estimated_lines(source: row_cache.Source) -> int:
  # From the file's first MB: counting every line would read (and for gzip, decompress) each
  # file once more before the build starts.
  lines = input_pipeline.estimate_lines(source.path)
  if source.part is None:
    return lines
  first, stop, num = source.part
  return lines * (stop - first) // num


def _slice(rows: row_cache.Rows, starts: np.ndarray, first: int, stop: int) -> row_cache.Rows:
  end = int(starts[stop]) if stop < len(rows) else len(rows.ids)
  return row_cache.Rows(rows.label[first:stop], rows.dense[first:stop],
                        rows.counts[first:stop], rows.ids[int(starts[first]):end])


def _record(rows, starts, first, stop):
  return {'block': row_cache.encode_block(_slice(rows, starts, first, stop)),
          'rows': stop - first}


class ElmBlocks(_Blocks):
  """The Ali ELM (Ele.me) click logs, parsed as DeepRec's DLRM reads them."""

  HOMEPAGE = 'https://tianchi.aliyun.com/dataset/dataDetail?dataId=131047'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the ELM day files (D{day}_{part}.csv.zip) from Alibaba Tianchi
  (https://tianchi.aliyun.com/dataset/dataDetail?dataId=131047), unzip them, and concatenate
  days 1-7 into `train.csv` and day 8 into `eval.csv` (no header lines). Put both files in the
  manual directory (by default ~/tensorflow_datasets/downloads/manual/; gzip'd files named
  train.csv.gz / eval.csv.gz work too).
  """
  BUILDER_CONFIGS = [BlocksConfig(name='default', spec=fs.elm_spec(),
                                  train_files=('train.csv',), eval_files=('eval.csv',))]


class CriteoBlocks(_Blocks):
  """Criteo click logs (Kaggle Display Advertising Challenge, or the 1TB logs)."""

  HOMEPAGE = 'https://ailab.criteo.com/ressources/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Criteo Kaggle: put `train.txt` (45,840,617 labelled rows, from the Kaggle Display Advertising
  Challenge archive dac.tar.gz) in the manual directory; its first 6/7 of lines are the train
  split and the last 1/7 the eval split (the Facebook DLRM reference tests on the first half of
  that last 1/7 only).
  Criteo 1TB: put `day_0` .. `day_23` (or day_N.gz as downloaded) in the manual directory;
  days 0-22 are the train split and day 23 the eval split.
  The manual directory is ~/tensorflow_datasets/downloads/manual/ unless
  DownloadConfig(manual_dir=...) says otherwise.
  """
  BUILDER_CONFIGS = [
      BlocksConfig(name='kaggle', spec=fs.criteo_spec(10000), train_files=('train.txt',),
                   split_parts=7, eval_parts=1),
      BlocksConfig(name='terabyte', spec=fs.criteo_spec(10000),
                   train_files=tuple(f'day_{d}' for d in range(23)), eval_files=('day_23',)),
  ]


BUILDERS = {'elm': ElmBlocks, 'criteo': CriteoBlocks}


def config_for(config, spec: fs.FeatureSpec) -> BlocksConfig:
  """The builder config of a run config: its files, split and spec."""
  train_default, eval_default = data_sources.FILE_NAMES[spec.name]

  def names(value):
    return tuple(n.strip() for n in value.split(',') if n.strip())

  parts = int(config.split_parts)
  fingerprint = row_cache.parse_fingerprint(spec)
  train_files = names(config.train_files or train_default)
  eval_files = () if parts else names(config.eval_files or eval_default)
  eval_parts = int(config.eval_parts)
  # Another choice of files or parts is another data set: TFDS would otherwise read the one
  # built first under this name (a run naming other files would train on the old ones). Data
  # sets of earlier releases, named without it, may hold any choice's rows: they are not used.
  chosen = (train_files, eval_files, eval_parts if parts else 1)
  # The parser's version too: a prepared data set is never checked again, as a cache's manifest
  # is, so rows another parser version reads differently are another data set.
  version = input_pipeline.PARSER_VERSION
  suffix = hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:8] + f'_p{version}'
  return BlocksConfig(
      name=f'{spec.name}_{fingerprint[:12]}_{parts or "files"}_{suffix}',
      description=f'spec {spec.name} (parse fingerprint {fingerprint}), train {train_files}, '
                  f'eval {eval_files or f"the last {eval_parts} of {parts} parts"}',
      spec=spec, train_files=train_files, eval_files=eval_files, split_parts=parts,
      eval_parts=eval_parts, skip_bad_rows=bool(config.skip_bad_rows),
      num_workers=int(config.num_workers))


class SourceChanged(ValueError):
  """A prepared data set was built from other versions of the files the run names."""


def _identities(identity: Dict[str, Any]) -> List[Dict[str, Any]]:
  """A source's file, and a TorchRec triple's other two files."""
  return [identity] + list(identity.get('companions', ()))


def check_sources(sources, manual_dir: str) -> None:
  """Refuses a prepared data set when a file it was built from differs from the file of that
  name in `manual_dir` (TFDS would read the old rows without a word)."""
  for split, source in sources.items():
    for built in source.dataset_info.metadata.get(f'{split}_sources', ()):
      path = os.path.join(manual_dir, os.path.basename(built['path']))
      try:
        now = row_cache.file_identity(path)
      except FileNotFoundError:
        continue  # deleted after the build: the data set is what is left of it
      # Compared by size and modification time: the data set may have been built from the files
      # at another path.
      changed = [(n, b) for n, b in zip(_identities(now), _identities(built))
                 if (n['size'], n['mtime_ns']) != (b['size'], b['mtime_ns'])]
      if changed:
        (now_file, built_file), = changed[:1]
        shown = path if now_file is now else now_file['path']
        raise SourceChanged(
            f'{shown} ({now_file["size"]} bytes) is not the file the TFDS data set in '
            f'{source.dataset_info.data_dir} was built from ({built_file["path"]}, '
            f'{built_file["size"]} bytes, another modification time): TFDS does not rebuild a '
            'prepared data set, so delete that directory to rebuild it from the current files '
            '(or read them through the row cache: tfds_data_dir=\'\')')


def data_source(config, spec: fs.FeatureSpec, manual_dir: str):
  """tfds.data_source of the run's data set, prepared from `manual_dir` first if needed, and
  checked against the files there (`check_sources`) at each call.

  Opened once a process: each builder TFDS makes stays alive in its own cache (with a log line),
  and a run opens its eval split at every evaluation.
  """
  builder_config = config_for(config, spec)
  key = (os.path.abspath(config.tfds_data_dir), builder_config.name, os.path.abspath(manual_dir))
  opened = _OPENED.get(key)
  # Reopened when its directory was deleted or rebuilt since (the fix check_sources names).
  if opened is None or opened[1] is None or _written(opened[0]) != opened[1]:
    sources = _open(config.tfds_data_dir, spec, builder_config, manual_dir)
    opened = _OPENED[key] = (sources, _written(sources))
  sources = opened[0]
  try:
    check_sources(sources, manual_dir)
    if not config.skip_bad_rows:
      check_bad_rows(sources)
  except Exception:
    del _OPENED[key]
    raise
  return sources


_OPENED: Dict[Tuple[str, str, str], Tuple[Any, Any]] = {}


def _written(sources):
  """(inode, mtime) of the data set's dataset_info.json, None when it is gone."""
  info = next(iter(sources.values())).dataset_info
  try:
    stat = os.stat(os.path.join(info.data_dir, 'dataset_info.json'))
  except OSError:
    return None
  return stat.st_ino, stat.st_mtime_ns


def _open(data_dir: str, spec: fs.FeatureSpec, builder_config: BlocksConfig, manual_dir: str):
  # Making a builder of a data set not yet prepared, TFDS makes a temporary directory for
  # dataset info from its GCS bucket (disabled: it stays empty) and never removes it.
  stray = os.path.join(tempfile.gettempdir(), 'tmp*tfds')
  before = set(glob.glob(stray))
  try:
    return tfds.data_source(
        BUILDERS[spec.name].name, data_dir=data_dir,
        builder_kwargs={'config': builder_config, 'file_format': 'array_record'},
        download_and_prepare_kwargs={'download_config': tfds.download.DownloadConfig(
            manual_dir=manual_dir)})
  finally:
    for path in set(glob.glob(stray)) - before:
      try:
        os.rmdir(path)  # only an empty one: what TFDS never fills with its GCS copy disabled
      except OSError:
        pass


def check_bad_rows(sources) -> None:
  """Refuses a data set built with skip_bad_rows=True that dropped rows, in a run that did not
  ask to drop them (as the row cache does)."""
  for split, source in sources.items():
    stats = source.dataset_info.metadata.get(f'{split}_stats') or {}
    if stats.get('bad_rows'):
      raise row_cache.bad_rows_error(
          stats, f'the {split} split of the TFDS data set in {source.dataset_info.data_dir}',
          '', '; set skip_bad_rows=True to train without them: the data set of the good rows is '
          'ready and will be used as it is')


def split_rows(config, spec: fs.FeatureSpec, manual_dir: str, split: str) -> int:
  """Rows of a split of the run's data set (prepared first if needed)."""
  source = data_source(config, spec, manual_dir)[split]
  count = len(source)
  return 0 if not count else (count - 1) * BLOCK_ROWS + int(source[count - 1]['rows'])


def row_reader(config, spec: fs.FeatureSpec, manual_dir: str, split: str, *,
               process_index: int = 0, process_count: int = 1,
               stats: Optional[input_pipeline.ParseStats] = None) -> row_cache.RowReader:
  """This process's records of a split (a contiguous range of them), as a RowReader.

  `reader.max_share_rows` bounds every process's rows, for an equal number of eval batches.
  The build's parse statistics of the split (the rows read, and those it dropped) are added to
  process 0's `stats`, as a whole-file row cache's are when it is opened: they are the whole
  split's, and train.global_parse_stats sums the processes' counts.
  """
  source = data_source(config, spec, manual_dir)[split]
  recorded = source.dataset_info.metadata.get(f'{split}_stats')
  if stats is not None and recorded and process_index == 0:
    stats.add(input_pipeline.ParseStats(**recorded))
  count = len(source)
  first, stop = process_index * count // process_count, (process_index + 1) * count // process_count
  rows = 0 if stop == first else ((stop - first - 1) * BLOCK_ROWS
                                  + int(source[stop - 1]['rows']))

  def read_unit(u):
    return row_cache.decode_block(source[first + u]['block'], spec)

  reader = row_cache.RowReader([row_cache.Segment(rows, BLOCK_ROWS, read_unit)], spec,
                               name=f'{BUILDERS[spec.name].name}/{split}')
  reader.max_share_rows = -(-count // process_count) * BLOCK_ROWS
  return reader
