r"""Input-pipeline speed and memory: CSV first pass, row-cache reads, TFDS blocks, RSS vs size.

  python -m experiments.data_benchmark --out_dir /tmp/data_bench             # ~10 min
  python -m experiments.data_benchmark --out_dir /tmp/data_bench --rows 200000 --rss_rows ''
  python -m experiments.data_benchmark --out_dir /tmp/data_bench --only rss --rss_rows \
      1000000,10000000

Every measurement runs in its own child process on planted data (`datagen`, generated once under
--out_dir and reused), so its peak resident memory is its own. Printed per format (ELM with the
reference's max_list_len 50 and ~10-value lists, Criteo with 26 tables of 10000 rows):
  * first pass: the CSV parsed into the row cache (what the first epoch of a run costs), with
    0 and 2 worker processes; rows/s of wall time, and CPU seconds of all processes per 1M rows;
    and for Criteo the same rows as TorchRec's .npy triple (`torchrec_npy`) into the cache;
  * cache read: one epoch of 512-row batches in the trainer's compact layout, shuffled as
    training is (buffer 20000), in one thread, alone and followed by the trainer's host-side id
    dedup (models.UniqueRows, the rest of what the input thread does per batch);
  * the CSV reader for comparison (parsing every epoch, one process);
  * transfer: a deduplicated batch of 512 handed to a jitted function as numpy arrays (copied
    in its dispatch, as the trainer does) against a jax.device_put of it first, alternately in
    one process (ELM only);
  * TFDS: array_record records of one 512-row block, and of one row each, read back;
  * RSS: peak resident memory of a process that caches a file and reads every batch of an
    epoch and of the evaluation through data_sources (what train.py calls), at each size of
    --rss_rows; and of the CSV reader streaming the same file.
The machine is shared and its speed drifts; compare rates measured in the same run. CPU
seconds (this process and its workers) are steadier than wall time here.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string('out_dir', os.path.join(tempfile.gettempdir(), 'dlrm_data_bench'),
                    'planted data, caches and results.json go here')
flags.DEFINE_integer('rows', 300_000, 'rows of the throughput files')
flags.DEFINE_list('formats', ['criteo', 'elm'], 'formats to measure')
flags.DEFINE_list('rss_rows', ['1000000', '10000000'], 'file sizes (rows) of the RSS test; '
                  'Criteo format')
flags.DEFINE_list('only', [], 'subset of: parse, npy, read, csv, transfer, tfds, rss')
flags.DEFINE_string('child', '', 'internal: run one measurement (JSON) and print its result')


def _spec(kind: str):
  from dlrm_jax import feature_spec as fs  # pylint: disable=g-import-not-at-top
  return fs.elm_spec() if kind == 'elm' else fs.criteo_spec(10000)


def _data(kind: str, rows: int) -> Dict[str, Any]:
  from dlrm_jax import datagen  # pylint: disable=g-import-not-at-top
  directory = os.path.join(FLAGS.out_dir, f'planted_{kind}_{rows}')
  return datagen.ensure_planted_data(directory, kind, train_rows=rows,
                                     eval_rows=max(1000, rows // 10), seed=1)


def _cpu_seconds() -> float:
  """CPU seconds of this process and of its children that have ended (worker pools are joined
  first, so that theirs count)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  for child in multiprocessing.active_children():
    child.join(timeout=30)
  done = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + done.ru_utime + done.ru_stime


def _peak_rss_mb() -> Dict[str, float]:
  """Peak resident memory of this process, and the largest of its finished children's.

  VmHWM, not getrusage: Linux carries ru_maxrss over exec from the forked copy of the parent,
  so a child started by a big parent would report the parent's size.
  """
  with open('/proc/self/status') as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
  return {'peak_rss_mb': hwm / 1024,
          'workers_peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------------
# Child measurements (each in a fresh process).

def _measure_parse(kind: str, path: str, workers: int) -> Dict[str, Any]:
  import shutil  # pylint: disable=g-import-not-at-top
  from dlrm_jax import row_cache  # pylint: disable=g-import-not-at-top
  root = os.path.join(FLAGS.out_dir, f'cache_parse_{kind}_{workers}')
  shutil.rmtree(root, ignore_errors=True)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  cache, _, rows = row_cache.open_or_build(row_cache.Source(path), _spec(kind), cache_root=root,
                                           num_workers=workers)
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  size = sum(os.path.getsize(os.path.join(cache.directory, f)) for f in os.listdir(
      cache.directory))
  out = {'rows': rows, 'rows_per_s': rows / wall, 'cpu_s_per_1m_rows': cpu / rows * 1e6,
         'csv_bytes_per_row': os.path.getsize(path) / rows, 'cache_bytes_per_row': size / rows,
         'ids_per_row': cache.manifest['ids'] / rows, 'wall_s': wall}
  shutil.rmtree(root, ignore_errors=True)
  return out


def _measure_npy(path: str) -> Dict[str, Any]:
  """The first pass of TorchRec's .npy triple of `path` (written once beside it) into the row
  cache, in one process (the triple is not parsed: no worker would help)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from dlrm_jax import row_cache  # pylint: disable=g-import-not-at-top
  from dlrm_jax import torchrec_npy  # pylint: disable=g-import-not-at-top
  dense = os.path.join(os.path.dirname(path), 'torchrec', 'train' + torchrec_npy.DENSE_SUFFIX)
  if not os.path.exists(torchrec_npy.companion_paths(dense)[1]):  # the labels: written last
    os.makedirs(os.path.dirname(dense), exist_ok=True)
    torchrec_npy.write_from_tsv(path, dense[:-len(torchrec_npy.DENSE_SUFFIX)])
  root = os.path.join(FLAGS.out_dir, 'cache_npy')
  shutil.rmtree(root, ignore_errors=True)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  _, _, rows = row_cache.open_or_build(row_cache.Source(dense), _spec('criteo'), cache_root=root)
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  shutil.rmtree(root, ignore_errors=True)
  return {'rows': rows, 'rows_per_s': rows / wall, 'cpu_s_per_1m_rows': cpu / rows * 1e6,
          'wall_s': wall}


def _cache_reader(kind: str, path: str):
  """A reader of `path`'s row cache (built on first use, kept under out_dir)."""
  from dlrm_jax import row_cache  # pylint: disable=g-import-not-at-top
  spec = _spec(kind)
  root = os.path.join(FLAGS.out_dir, f'cache_read_{kind}')
  cache, start, stop = row_cache.open_or_build(row_cache.Source(path), spec, cache_root=root,
                                               num_workers=2)
  return row_cache.RowReader([row_cache.cache_segment(cache, start, stop, 1024)], spec)


def _measure_read(kind: str, path: str, dedup: bool) -> Dict[str, Any]:
  from dlrm_jax import models  # pylint: disable=g-import-not-at-top
  reader = _cache_reader(kind, path)
  unique = models.UniqueRows(_spec(kind), emb_fusion=True) if dedup else None
  rows = 0
  wall, cpu = time.perf_counter(), time.process_time()
  # The compact layout, as the trainer reads the cache.
  for batch in reader.batches(512, shuffle_buffer=20000, seed=1, compact=True):
    if unique is not None:
      unique(batch)
    rows += 512
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {'rows': rows, 'rows_per_s': rows / wall, 'rows_per_cpu_s': rows / cpu}


def _measure_csv(kind: str, path: str) -> Dict[str, Any]:
  from dlrm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  rows = 0
  wall, cpu = time.perf_counter(), time.process_time()
  for batch in input_pipeline.batches(path, _spec(kind), 512, shuffle_buffer=20000, seed=1):
    rows += len(batch['label'])
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {'rows': rows, 'rows_per_s': rows / wall, 'rows_per_cpu_s': rows / cpu}


def _measure_transfer(kind: str, path: str, batches: int = 64, rounds: int = 7) -> Dict[str, Any]:
  """Host milliseconds per batch of getting deduplicated batches into a jitted function."""
  import statistics  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from dlrm_jax import models  # pylint: disable=g-import-not-at-top
  from dlrm_jax import train  # pylint: disable=g-import-not-at-top
  unique = models.UniqueRows(_spec(kind), emb_fusion=True)
  host = [unique(b) for _, b in zip(range(batches),
                                    _cache_reader(kind, path).batches(512, compact=True))]
  mesh = train.make_mesh(default.get_config())
  shardings = train.batch_sharding(mesh)
  # Reads one element of each array, so that every array is an argument the program uses.
  consume = train.jit_on_batches(
      lambda s, b: s + sum(x.reshape(-1)[0].astype('float32') for x in jax.tree.leaves(b)), mesh)
  zero = jax.numpy.zeros(())

  def numpy_args():
    s = zero
    for b in host:
      s = consume(s, b)
    return s

  def placed_first():
    s = zero
    for b in host:
      s = consume(s, jax.device_put(b, shardings))
    return s

  ways = {'numpy_into_jit': numpy_args, 'device_put_then_jit': placed_first}
  times = {name: [] for name in ways}
  for name, run in ways.items():
    jax.block_until_ready(run())  # compiles
  for _ in range(rounds):
    for name, run in ways.items():
      start_s = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append((time.perf_counter() - start_s) / len(host) * 1e3)
  out = {f'{name}_ms_per_batch': statistics.median(t) for name, t in times.items()}
  out['device_put_over_numpy'] = statistics.median(
      [a / b for a, b in zip(times['device_put_then_jit'], times['numpy_into_jit'])])
  return out


def _measure_tfds(kind: str, path: str) -> Dict[str, Any]:
  """array_record written through TFDS, read with tfds.data_source: 512-row blocks vs rows."""
  import shutil  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dlrm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from dlrm_jax import row_cache  # pylint: disable=g-import-not-at-top
  from dlrm_jax import tfds_builders  # pylint: disable=g-import-not-at-top
  spec = _spec(kind)
  names = {'elm': ('train.csv', 'eval.csv'), 'criteo': ('train.txt', 'eval.txt')}[kind]
  config = tfds_builders.BlocksConfig(name=f'bench_{kind}', spec=spec, train_files=names[:1],
                                      eval_files=names[1:], num_workers=2)
  data_dir = os.path.join(FLAGS.out_dir, f'tfds_{kind}')
  shutil.rmtree(data_dir, ignore_errors=True)
  builder = tfds_builders.BUILDERS[kind](config=config, data_dir=data_dir,
                                         file_format='array_record')
  wall, cpu = time.perf_counter(), _cpu_seconds()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.dirname(path)))
  build_s, build_cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  source = tfds.data_source(tfds_builders.BUILDERS[kind].name, data_dir=data_dir,
                            builder_kwargs={'config': config, 'file_format': 'array_record'},
                            download=False)['train']
  order = np.random.default_rng(0).permutation(len(source))
  rows = 0
  wall, cpu = time.perf_counter(), time.process_time()
  for i in order.tolist():
    rows += len(row_cache.decode_block(source[i]['block'], spec))
  block_rate = rows / (time.perf_counter() - wall)
  block_cpu_rate = rows / (time.process_time() - cpu)

  # One row per record, the obvious layout: a few thousand rows are enough to see its rate.
  class OneRow(tfds_builders.ElmBlocks if kind == 'elm' else tfds_builders.CriteoBlocks):
    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'label': tfds.features.Scalar(np.float32),
          'dense': tfds.features.Tensor(shape=(spec.num_dense,), dtype=np.float32),
          'ids': tfds.features.Tensor(shape=(spec.num_slots,), dtype=np.int32),
          'weights': tfds.features.Tensor(shape=(spec.num_slots,), dtype=np.float32)}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {'train': self._rows()}

    def _rows(self):
      lines = []
      with open(path) as f:
        for _ in range(5000):
          lines.append(f.readline().rstrip('\n'))
      batch = input_pipeline.parse_chunk(lines, spec, path=path, first_line=1)
      for i in range(len(lines)):
        yield i, {k: v[i] for k, v in batch.items()}

  rows_dir = os.path.join(FLAGS.out_dir, f'tfds_rows_{kind}')
  shutil.rmtree(rows_dir, ignore_errors=True)
  one = OneRow(config=config, data_dir=rows_dir, file_format='array_record')
  one.download_and_prepare()
  rows_source = one.as_data_source()['train']
  wall = time.perf_counter()
  for i in np.random.default_rng(0).permutation(len(rows_source)).tolist():
    rows_source[i]
  row_rate = len(rows_source) / (time.perf_counter() - wall)
  built_rows = sum(builder.info.metadata[f'{split}_rows'] for split in ('train', 'eval'))
  return {'build_rows_per_s': built_rows / build_s,
          'build_cpu_s_per_1m_rows': build_cpu / built_rows * 1e6,
          'block_records_rows_per_s': block_rate, 'block_records_rows_per_cpu_s': block_cpu_rate,
          'row_records_rows_per_s': row_rate}


def _measure_rss(path_dir: str, use_cache: bool) -> Dict[str, Any]:
  """A first run's data path through data_sources: resolve (building the caches from scratch),
  every batch of an epoch, then the evaluation."""
  import shutil  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
  from dlrm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.feature_spec = 'criteo'
  config.data_location = path_dir
  config.hash_buckets = 10000
  for key, value in dict(use_cache=use_cache, num_workers=2,
                         cache_dir=os.path.join(FLAGS.out_dir, 'cache_rss')).items():
    config[key] = value
  spec = _spec('criteo')
  shutil.rmtree(config.cache_dir, ignore_errors=True)
  wall = time.perf_counter()
  data = data_sources.resolve(config, spec, process_index=0, process_count=1)
  after_build = _peak_rss_mb()
  stats = input_pipeline.ParseStats()
  steps = data.train_rows // config.batch_size
  rows = 0
  for batch in data_sources.train_batches(config, spec, data, num_steps=steps, stats=stats,
                                          process_index=0, process_count=1):
    rows += len(batch['label'])
  for batch in data_sources.eval_batches(config, spec, data, stats=stats, process_index=0,
                                         process_count=1):
    rows += int(batch['mask'].sum())
  return {'rows_read': rows, 'train_rows': data.train_rows, 'wall_s': time.perf_counter() - wall,
          'peak_rss_mb_after_resolve': after_build['peak_rss_mb'], **_peak_rss_mb()}


def _child(request: Dict[str, Any]) -> Dict[str, Any]:
  what = request.pop('what')
  return {'parse': _measure_parse, 'npy': _measure_npy, 'read': _measure_read,
          'csv': _measure_csv, 'transfer': _measure_transfer, 'tfds': _measure_tfds,
          'rss': _measure_rss}[what](**request)


def _run_child(**request) -> Dict[str, Any]:
  command = [sys.executable, os.path.abspath(__file__), f'--out_dir={FLAGS.out_dir}',
             f'--child={json.dumps(request)}']
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  for line in done.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  raise RuntimeError(f'{request} failed:\n{done.stderr[-3000:]}')


def main(argv):
  del argv
  if FLAGS.child:
    print('RESULT ' + json.dumps(_child(json.loads(FLAGS.child))), flush=True)
    return
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  only = set(FLAGS.only) or {'parse', 'npy', 'read', 'csv', 'transfer', 'tfds', 'rss'}
  results: Dict[str, Any] = {'cpus': os.cpu_count(), 'load_avg': os.getloadavg()}

  def report(name, value):
    results[name] = value
    print(f'{name}: ' + ', '.join(f'{k}={v:,.1f}' if isinstance(v, float) else f'{k}={v}'
                                  for k, v in value.items()), flush=True)

  for kind in FLAGS.formats:
    path = _data(kind, FLAGS.rows)['train_path']
    if 'parse' in only:
      for workers in (0, 2):
        report(f'{kind}/first_pass_workers{workers}',
               _run_child(what='parse', kind=kind, path=path, workers=workers))
    if 'npy' in only and kind == 'criteo':
      report(f'{kind}/torchrec_npy_first_pass', _run_child(what='npy', path=path))
    if 'read' in only:
      report(f'{kind}/cache_read', _run_child(what='read', kind=kind, path=path, dedup=False))
      report(f'{kind}/cache_read+dedup', _run_child(what='read', kind=kind, path=path,
                                                    dedup=True))
    if 'csv' in only:
      report(f'{kind}/csv_every_epoch', _run_child(what='csv', kind=kind, path=path))
    if 'transfer' in only and kind == 'elm':
      report(f'{kind}/transfer', _run_child(what='transfer', kind=kind, path=path))
    if 'tfds' in only:
      report(f'{kind}/tfds', _run_child(what='tfds', kind=kind, path=path))
  if 'rss' in only:
    for rows in [int(r) for r in FLAGS.rss_rows if r]:
      directory = os.path.dirname(_data('criteo', rows)['train_path'])
      report(f'rss/criteo_{rows}_cache', _run_child(what='rss', path_dir=directory,
                                                    use_cache=True))
      report(f'rss/criteo_{rows}_csv', _run_child(what='rss', path_dir=directory,
                                                  use_cache=False))
  results['load_avg_end'] = os.getloadavg()
  with open(os.path.join(FLAGS.out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print(f"wrote {os.path.join(FLAGS.out_dir, 'results.json')}")


if __name__ == '__main__':
  app.run(main)
