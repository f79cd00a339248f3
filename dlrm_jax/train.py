"""Training and evaluation: state, jitted steps, the loop, results.

The train step comes in two flavours with one signature:
  * dense (`sparse_updates=False`, the A/B baseline): jax.grad through the gather, one optax
    chain over MLPs and tables alike, so every table row and its optimizer slots are rewritten
    each step;
  * sparse (default): gradients with respect to the looked-up rows only, summed per unique row,
    and a row-wise optimizer that gathers, updates and scatters just those rows in place
    (donated buffers); the MLPs keep their optax chain.
Both are jitted over a device mesh: the batch is split over the 'data' axis, the tables and
their optimizer slots by rows over the 'model' axis, everything else is replicated, and batch
norm sees the global batch, so one device and N devices agree.
"""

import contextlib
import ctypes
import dataclasses
import functools
import glob
import itertools
import json
import math
import os
import shlex
import shutil
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import flax.struct
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dlrm_jax import checkpoints
from dlrm_jax import data_sources
from dlrm_jax import feature_spec as fs
from dlrm_jax import input_pipeline
from dlrm_jax import metric_writer
from dlrm_jax import metrics
from dlrm_jax import models
from dlrm_jax import optimizers
from dlrm_jax import row_cache
from dlrm_jax import serving
from dlrm_jax import torchrec_npy

Batch = Dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any            # {'mlp': flax params, 'tables': {name: [rows, dim]}}
  batch_stats: Any       # batch-norm running statistics
  opt_state: Any         # optax state: over params['mlp'] (sparse) or all params (dense)
  table_opt_state: Any   # row-wise optimizer state per table array ({} on the dense path)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The static pieces a run is built from; derived once from the config."""
  spec: fs.FeatureSpec
  model: models.DLRM
  tx: optax.GradientTransformation
  row_tx: Optional[optimizers.RowwiseOptimizer]  # None on the dense path
  emb_fusion: bool
  mesh: Mesh
  # With several processes each one dedups its own rows; the step merges ids repeated across
  # processes before the row-wise update.
  merge_across_processes: bool = False


def effective_options(config: ml_collections.ConfigDict) -> Dict[str, bool]:
  """The acceleration switches after `no_acceleration` (DeepRec's --tf) has been applied."""
  names = ('bf16', 'emb_fusion', 'op_fusion', 'smartstaged', 'sparse_updates')
  if config.no_acceleration:
    return {n: False for n in names}
  return {n: bool(config[n]) for n in names}


def make_mesh(config) -> Mesh:
  """A ('data', 'model') device mesh; -1 on the data axis takes all remaining devices."""
  try:
    return _make_mesh(config)
  except ValueError as e:  # every process sees the same devices: all refuse the mesh at once
    raise data_sources.raised_together(e)


def _make_mesh(config) -> Mesh:
  data, model = config.mesh_shape
  devices = jax.devices()
  if data == -1:
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f'mesh_shape {tuple(config.mesh_shape)} does not cover the '
                     f'{len(devices)} devices')
  if models.ROW_MULTIPLE % model:
    raise ValueError(f'the model axis ({model}) must divide {models.ROW_MULTIPLE}, the multiple '
                     'table rows are padded to')
  grid = np.asarray(devices).reshape(data, model)
  # Each process reads rows of its own into the batch's 'data' shards. Devices that share a data
  # index are replicas of one shard, so they must be one process's: across processes they would
  # hold different rows under one name, and the "replicated" weights would drift apart.
  for row in grid:
    owners = sorted({d.process_index for d in row})
    if len(owners) > 1:
      raise ValueError(
          f'mesh_shape {tuple(config.mesh_shape)}: the model axis ({model}) spans processes '
          f'{owners}; with {jax.process_count()} processes of {jax.local_device_count()} devices '
          f'each, the model axis must lie within a process (at most {jax.local_device_count()}, '
          'dividing it): tables split over one host\'s devices, and the data axis spans hosts')
  # models.UniqueRows numbers process p's rows as block p of the batch: processes in data order.
  row_owners = [row[0].process_index for row in grid]
  if row_owners != sorted(row_owners):
    raise ValueError(f'jax.devices() puts the processes along the data axis in the order '
                     f'{row_owners}; this trainer needs process p to hold block p of the batch')
  return Mesh(grid, ('data', 'model'))


def check_config(config) -> None:
  """Fails at once, naming every field, on values that would otherwise fail mid-run (a zero
  eval batch after training, a zero embedding dim at the first save) or silently do something
  else (a negative save_steps saving every step, negative steps training none)."""
  problems = []

  def need(field, ok, rule):
    if not ok:
      problems.append(f'config.{field}={config[field]!r} must be {rule}')

  def number(field, test) -> bool:
    # ConfigDict lets any field be set to None in Python (TF's Saver(max_to_keep=None) keeps
    # all): a comparison would fail with a TypeError that names no field.
    value = config[field]
    return isinstance(value, (int, float)) and not isinstance(value, bool) and test(value)

  for field in ('batch_size', 'eval_batch_size', 'embedding_dim', 'hash_buckets', 'max_list_len',
                'log_every_steps', 'cache_block_rows'):
    need(field, number(field, lambda v: v > 0), 'positive')
  for field in ('steps', 'save_steps', 'keep_checkpoint_max', 'shuffle_buffer', 'timeline',
                'activation_summary_steps', 'split_parts', 'eval_every_steps'):
    need(field, number(field, lambda v: v >= 0), '0 or more')
  need('learning_rate', number('learning_rate', lambda v: math.isfinite(v) and v >= 0),
       'a finite number, 0 or more')
  need('bottom_mlp', len(config.bottom_mlp) > 0 and min(config.bottom_mlp) > 0,
       'one or more positive layer widths')
  need('top_mlp', all(width > 0 for width in config.top_mlp), 'positive layer widths')
  need('criteo_table_rows', all(rows > 0 for rows in config.criteo_table_rows),
       'positive row counts (or empty: hash_buckets each)')
  need('num_workers', number('num_workers', lambda v: v >= -1),
       '-1 (one per core) or 0 or more')
  # Seeds initialisation (init_key) and the shuffle (numpy's generators), as TF's int64 seed.
  need('seed', number('seed', lambda v: 0 <= v < 2**63), 'an integer in [0, 2**63)')
  mesh = tuple(config.mesh_shape)
  need('mesh_shape', len(mesh) == 2 and (mesh[0] == -1 or mesh[0] > 0) and mesh[1] > 0,
       '(data, model): a positive size or -1 (all the other devices) for data, a positive one '
       'for model')
  need('mode', config.mode in ('train', 'eval', 'predict'), "'train', 'eval' or 'predict'")
  need('feature_spec', config.feature_spec in ('elm', 'criteo'), "'elm' or 'criteo'")
  need('interaction_op', config.interaction_op in models.INTERACTIONS,
       ' or '.join(map(repr, models.INTERACTIONS)))
  if config.interaction_op == 'dcn':
    for field in ('dcn_num_layers', 'dcn_low_rank_dim'):
      need(field, number(field, lambda v: isinstance(v, int) and v >= 1),
           'a whole number, at least 1, for interaction_op=dcn')
  need('optimizer', config.optimizer in optimizers.OPTIMIZER_NAMES,
       'one of ' + ', '.join(optimizers.OPTIMIZER_NAMES))
  if config.optimizer in optimizers.OPTIMIZER_NAMES:
    try:  # building an optax chain runs nothing on a device (cpu_async_dispatch still applies)
      optimizers.create(config.optimizer, config.learning_rate,
                        **{k: v for k, v in config.optimizer_hparams.items() if v is not None})
    except (TypeError, ValueError) as e:
      problems.append(f'config.optimizer_hparams: {e}')
  if config.interaction_op == 'dot' and config.bottom_mlp:
    # The dot interaction takes the bottom MLP's output as one more embedding.
    need('bottom_mlp', config.bottom_mlp[-1] == config.embedding_dim,
         f'widths ending at embedding_dim={config.embedding_dim} for interaction_op=dot')
  if config.mode == 'predict':
    need('predict_input', bool(config.predict_input), 'a file to score in mode=predict')
  if problems:
    raise ValueError('bad config: ' + '; '.join(problems))


# The largest Adam learning rate at which dcn trained in every run we made (README, Ablation).
DCN_STABLE_ADAM_RATE = 0.003


def log_overridden_settings(config) -> None:
  """Names the settings that another one overrides; both used to be ignored without a word.

  Apart from check_config so that the planner, which checks a config once per mesh it tries,
  says this once.
  """
  if config.split_parts and config.eval_files:
    logging.warning('config.eval_files=%r is not read: with split_parts=%d the eval rows are the '
                    'last eval_parts=%d parts of the train files', config.eval_files,
                    config.split_parts, config.eval_parts)
  if config.feature_spec == 'criteo' and config.criteo_table_rows:
    logging.info('criteo_table_rows sizes the 26 tables (%d rows in all); hash_buckets=%d is not '
                 'used', sum(config.criteo_table_rows), config.hash_buckets)
  if config.interaction_op == 'dcn':
    if (config.optimizer in ('adam', 'adamasync')
        and config.learning_rate > DCN_STABLE_ADAM_RATE):
      logging.warning('interaction_op=dcn with %s at learning_rate=%g: the cross layers '
                      'diverged under Adam at 0.01 in our runs (the default config: eval AUC '
                      '0.50, from 0.822 at 0.003); MLPerf trains them with Adagrad',
                      config.optimizer, config.learning_rate)
    width = models.interaction_width(fs.from_config(config), config.bottom_mlp[-1], 'dcn')
    if 2 * config.dcn_low_rank_dim >= width:
      # V [N -> r] and W [r -> N] then cost at least a full-rank [N -> N] cross layer.
      logging.warning('dcn_low_rank_dim=%d is at least half the cross layers\' width %d: a '
                      'full-rank layer would cost no more (MLPerf\'s 512 is for its 3456-wide '
                      'input; TorchRec suggests about a quarter of the width)',
                      config.dcn_low_rank_dim, width)


def set_cpu_dispatch(config) -> None:
  """Chooses where XLA:CPU runs a computation: on a pool thread or on the thread that calls it.

  JAX's default hands each computation to a pool thread and returns at once. Every pool thread
  then keeps a glibc heap of its own for the step's temporaries, and the caller can run many
  steps ahead; with `cpu_async_dispatch=False` a step runs and frees its temporaries on the
  caller's thread, and the next step reuses them. On the Criteo config that is 23-61 MiB less
  peak at the same step speed (docs/performance.md, "Memory"). The batches are still read and
  deduplicated ahead in their own thread (smartstaged). It only takes effect before JAX creates
  its CPU backend: a process that has already run JAX keeps the setting it started with. The
  setting is JAX's, process-wide: a notebook's own JAX code runs with it afterwards too.
  """
  wanted = bool(config.cpu_async_dispatch)
  current = jax.config.read('jax_cpu_enable_async_dispatch')
  if current == wanted:
    return
  if _backends_started():
    if wanted not in _DISPATCH_WARNED:  # once a process: a notebook calls again and again
      _DISPATCH_WARNED.add(wanted)
      logging.warning('cpu_async_dispatch=%s has no effect: JAX already runs with %s (set it '
                      'before the first JAX computation of the process)', wanted, current)
    return
  jax.config.update('jax_cpu_enable_async_dispatch', wanted)


_DISPATCH_WARNED = set()


def _backends_started() -> bool:
  # JAX has no public query for this; without it, assume the worst (the setting is skipped).
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, 'backends_are_initialized', None)
  return started() if started else True


def initialize_distributed(config) -> None:
  """Joins a multi-process run when the config names a coordinator (once per process)."""
  dist = config.distributed
  if not dist.coordinator_address or jax.distributed.is_initialized():
    return
  if dist.cpu_collectives:
    # CPU devices talk through gloo (tests run two processes on localhost this way). The backend
    # must not be touched before initialize(), so this is a config switch, not a device query.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                             num_processes=dist.num_processes, process_id=dist.process_id)


_STOP_KEY = 'dlrm_jax/stop/{run}/{process}'  # another process's failure, or '' at the end
_STOPPED_KEY = 'dlrm_jax/stopped/{run}/{process}'  # set as that process exits with a failure
_RUNS = itertools.count()  # train_and_evaluate calls: every process makes the same ones


def _coordination_client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return getattr(distributed.global_state, 'client', None)


def _try_set(client, key: str, value: str) -> None:
  try:
    client.key_value_set(key, value)  # the first value a key is given stays: ALREADY_EXISTS
  except Exception:  # pylint: disable=broad-except
    pass


def _try_get(client, key: str) -> Optional[str]:
  try:
    return client.key_value_try_get(key)
  except Exception:  # pylint: disable=broad-except
    return None  # NOT_FOUND


def _log_now(message: str) -> None:
  logging.error('%s', message)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()


@contextlib.contextmanager
def stopping_together() -> Iterator[None]:
  """In a multi-process run, a process failing alone in the block stops every process at once.

  Without it, the others waited in their next collective while the failed one waited for them
  in JAX's shutdown barrier: 5 minutes, then all aborted, the others' logs not saying why. The
  failed process writes its error into each other process's key in jax.distributed's key-value
  store and exits with status 1, its traceback logged; a thread in each process waits on its key
  and exits its process naming the failed one. Process 0 exits last: it holds the coordination
  service, without which the others' clients abort. The failed process's run has closed by then
  (a save in flight finished, or left as <step>.orbax-checkpoint-tmp, which a resume removes).
  Exiting skips the shutdown barrier, which would wait for the exited processes. An error every
  process raises together (data_sources.raised_together), a preemption notice's stop, and a
  failure after every other process has ended its block are raised as they are: all processes
  meet in the barrier. A notebook that joined a multi-process run ends with a lone failure.
  With three or more processes, one that has already ended its block is not told (it waits in
  the barrier as before).
  """
  client = _coordination_client() if jax.process_count() > 1 else None
  if client is None:
    yield
    return
  me, run = jax.process_index(), next(_RUNS)
  others = [p for p in range(jax.process_count()) if p != me]
  stop_key = functools.partial(_STOP_KEY.format, run=run)
  stopped_key = functools.partial(_STOPPED_KEY.format, run=run)
  failing_here = threading.Event()  # the main thread is handling its own error

  def leave(text: str) -> None:
    for p in others:
      _try_set(client, stop_key(process=p), text)
    _try_set(client, stopped_key(process=me), '1')
    if me == 0:
      for p in others:
        if _try_get(client, stop_key(process=p)):  # stopping, not ended ('')
          try:
            client.blocking_key_value_get(stopped_key(process=p), 10 * 1000)
          except Exception:  # pylint: disable=broad-except
            pass
      time.sleep(0.5)  # from their key to their exit
    os._exit(1)  # pylint: disable=protected-access

  def watch():
    while True:
      try:
        text = client.blocking_key_value_get(stop_key(process=me), 3600 * 1000)
        break
      except Exception as e:  # pylint: disable=broad-except
        if 'DEADLINE_EXCEEDED' not in str(e):
          return  # the client has shut down
    if text and not failing_here.is_set():  # '': the block has ended here
      _log_now(f'stopping: {text} (its log says why)')
      leave(text)

  watcher = threading.Thread(target=watch, daemon=True, name='dlrm_jax stop watcher')
  watcher.start()
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    # A stop at a step every process agreed on, or an error they all raise, meets the others
    # in the shutdown barrier; anything else (a Ctrl-C on one host outside the training loop,
    # whose notices stop every process at one step) is one process's.
    if isinstance(e, checkpoints.Preempted) or getattr(e, 'failed_together', False):
      raise
    failing_here.set()
    first = _try_get(client, stop_key(process=me))
    if first:  # this error followed from that one (a collective broken off), or is the same
      _log_now(f'here: {type(e).__name__}: {e}')
      _log_now(f'stopping: {first} (its log says why)')
      leave(first)
    text = f'process {me} failed: {type(e).__name__}: {e}'[:2000]
    for p in others:
      _try_set(client, stop_key(process=p), text)
    if all(_try_get(client, stop_key(process=p)) == '' for p in others):
      raise  # every other process has ended its block: all meet in the shutdown barrier
    logging.exception('process %d failed; stopping the other processes', me)
    leave(text)
  finally:
    # Ends the watcher (a thread left in a blocking call aborts the interpreter's exit); set by
    # another process's failure first, the key keeps that.
    _try_set(client, stop_key(process=me), '')
    watcher.join(timeout=10)


def warn_if_bf16_is_emulated(config, flags: Optional[frozenset] = None) -> None:
  """bf16 pays on a CPU that multiplies bfloat16 natively (AVX-512 BF16, AMX); elsewhere every
  product runs on operands converted to float32 (models._bf16_dot) beside the conversions of
  the activations, and the step runs slower than in float32 (0.9x measured on an AVX2-only EPYC,
  docs/performance.md)."""
  if effective_options(config)['bf16'] and models.emulates_bfloat16(flags):
    logging.warning('bf16: this CPU has no native bfloat16 arithmetic (no avx512_bf16 or '
                    'amx_bf16 flag), so the step runs slower than in float32 here; '
                    '--config.bf16=False is faster on it')


def make_setup(config) -> Setup:
  options = effective_options(config)
  spec = fs.from_config(config)
  model = models.DLRM(
      bottom_mlp=tuple(config.bottom_mlp), top_mlp=tuple(config.top_mlp),
      interaction_op=config.interaction_op, batch_norm=config.batch_norm,
      dtype=jnp.bfloat16 if options['bf16'] else jnp.float32,
      dcn_num_layers=config.dcn_num_layers, dcn_low_rank_dim=config.dcn_low_rank_dim)
  hparams = {k: v for k, v in config.optimizer_hparams.items() if v is not None}
  tx = optimizers.create(config.optimizer, config.learning_rate, **hparams)
  row_tx = (optimizers.create_sparse(config.optimizer, config.learning_rate, **hparams)
            if options['sparse_updates'] else None)
  mesh = make_mesh(config)
  check_batch_split(config, mesh.shape['data'])
  return Setup(spec, model, tx, row_tx, options['emb_fusion'], mesh,
               merge_across_processes=jax.process_count() > 1)


def check_batch_split(config, data_devices: int, mesh_shape=None) -> None:
  """Batches split evenly over the mesh's data axis (and so over processes), or JAX refuses the
  first batch, after the data are written and cached. `mesh_shape`: default config.mesh_shape."""
  evaluates = config.mode != 'train' or not config.no_eval
  mesh_shape = tuple(config.mesh_shape if mesh_shape is None else mesh_shape)
  for field in ('batch_size',) + (('eval_batch_size',) if evaluates else ()):
    if config[field] % data_devices:
      raise ValueError(
          f'config.{field}={config[field]} does not split over the {data_devices} devices of the '
          f'mesh\'s data axis (mesh_shape {mesh_shape}): use a multiple of '
          f'{data_devices}, e.g. {-(-config[field] // data_devices) * data_devices}')


# ------------------------------------------------------------------------------------------------
# State.

def state_shardings(state, mesh: Mesh):
  """Tables and their optimizer slots split by rows over 'model'; everything else replicated.

  A leaf is table-shaped when it sits under a 'tables' key (the tables, and optax's slots for
  them on the dense path) or in `table_opt_state`, and has rows.
  """
  def sharding(path, leaf):
    keys = {str(getattr(k, 'key', getattr(k, 'name', ''))) for k in path}
    table_like = ('tables' in keys or 'table_opt_state' in keys) and jnp.ndim(leaf) >= 1
    return NamedSharding(mesh, P('model', None) if table_like else P())
  return jax.tree_util.tree_map_with_path(sharding, state)


def abstract_train_state(setup: Setup) -> TrainState:
  """The state's shapes, dtypes and shardings, with nothing allocated: for compiling, sizing and
  restoring before any state exists."""
  abstract = jax.eval_shape(functools.partial(_init_state, setup), jax.random.PRNGKey(0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, state_shardings(abstract, setup.mesh))


def init_key(seed: int) -> jax.Array:
  """The initialisation's key from every bit of `seed` (check_config takes up to 2**63).

  jax.random.PRNGKey keeps the low 32 bits (in JAX's default 32-bit mode), so seeds 2**32 apart
  started from the same weights while their shuffles (numpy, all 64 bits) differed. Seeds below
  2**32 keep the key they always had.
  """
  key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
  return jax.random.fold_in(key, seed >> 32) if seed >> 32 else key


def create_train_state(rng: jax.Array, setup: Setup) -> TrainState:
  """A fresh state, created directly in its sharded layout (tables never sit on one device)."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract_train_state(setup))
  init = jax.jit(functools.partial(_init_state, setup), out_shardings=shardings)
  if isinstance(rng, jax.core.Tracer):  # traced (e.g. under eval_shape): nothing is allocated
    return init(rng)
  compiled = init.lower(rng).compile()
  # The jitted function keeps its trace and lowering (~12 MiB for the Criteo tables' initialiser)
  # for as long as it lives: dropped now, they are handed back with the compiler's leftovers.
  del init
  return_freed_heap()  # before the tables are allocated on top of the compiler's leftovers
  state = jax.block_until_ready(compiled(rng))
  del compiled
  return_freed_heap()  # the initialiser's program and temporaries, freed only now
  return state


def compile_ahead(calls: Sequence[Tuple[Callable, tuple]]) -> None:
  """Compiles jitted functions for (abstract) arguments before the state exists.

  The compiler's heap (about 100 MB for the Criteo step) then comes and goes, and is handed back
  to the OS, before the tables are allocated, instead of adding to their peak. Each function's
  first call finds its program in JAX's compilation cache. Functions that are not jitted (the
  staged step, op_fusion off) compile at their first call.
  """
  for fun, args in calls:
    if hasattr(fun, 'lower'):
      fun.lower(*args).compile()
  return_freed_heap()


def return_freed_heap() -> None:
  """Hands the heap that the compiler freed back to the OS.

  glibc keeps freed small allocations in its arenas, and compiling a step leaves ~100 MB of
  them; the tables allocated next would add to that peak. A no-op without glibc's malloc_trim.
  """
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _init_state(setup: Setup, rng: jax.Array) -> TrainState:
  table_rng, mlp_rng = jax.random.split(rng)
  spec = setup.spec
  tables = models.init_tables(table_rng, spec, setup.emb_fusion)
  variables = setup.model.init(
      mlp_rng, jnp.zeros((2, spec.num_dense)),
      jnp.zeros((2, spec.num_sparse, spec.embedding_dim)), train=False)
  params = {'mlp': variables['params'], 'tables': tables}
  if setup.row_tx is None:
    opt_state, table_opt_state = setup.tx.init(params), {}
  else:
    opt_state = setup.tx.init(params['mlp'])
    table_opt_state = {name: setup.row_tx.init(t) for name, t in tables.items()}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=opt_state,
                    table_opt_state=table_opt_state)


# ------------------------------------------------------------------------------------------------
# Steps.

def forward(setup: Setup, mlp_params, batch_stats, batch: Batch, unique_rows, train: bool):
  """Logits from the batch's unique rows; in training also the updated batch statistics."""
  pooled = models.embed(unique_rows, batch, setup.spec, setup.emb_fusion)
  return apply_model(setup, mlp_params, batch_stats, batch['dense'], pooled, train)


def apply_model(setup: Setup, mlp_params, batch_stats, dense: jax.Array, pooled: jax.Array,
                train: bool):
  """Logits from dense features and pooled embeddings (the model without its tables)."""
  variables = {'params': mlp_params, 'batch_stats': batch_stats}
  if train:
    logits, updates = setup.model.apply(variables, dense, pooled, train=True,
                                        mutable=['batch_stats'])
    return logits, updates['batch_stats']
  return setup.model.apply(variables, dense, pooled, train=False), batch_stats


def bce_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean binary cross-entropy over the real (mask 1) rows, from logits for stability."""
  per_row = optax.sigmoid_binary_cross_entropy(logits, labels)
  return jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lookup(tables, batch: Batch):
  """Each table array's unique rows for this batch (padding entries read as zeros)."""
  return models.gather_unique_rows(tables, batch['unique_ids'])


def dense_grads(setup: Setup, state: TrainState, batch: Batch):
  """Loss, new batch stats and gradients of every parameter, tables included."""
  def loss_fn(params):
    unique_rows = lookup(params['tables'], batch)
    logits, stats = forward(setup, params['mlp'], state.batch_stats, batch, unique_rows,
                            train=True)
    return bce_loss(logits, batch['label'], batch['mask']), stats
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, stats, grads


def dense_apply(setup: Setup, state: TrainState, stats, grads) -> TrainState:
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=stats, opt_state=opt_state)


def sparse_grads(setup: Setup, state: TrainState, batch: Batch, unique_rows):
  """Loss, new batch stats, MLP gradients and the gradient of each unique looked-up row.

  Differentiating with respect to the unique rows (not the tables) sums the gradients of
  repeated ids for free and never materialises a table-sized gradient.
  """
  def loss_fn(mlp_params, unique_rows):
    logits, stats = forward(setup, mlp_params, state.batch_stats, batch, unique_rows,
                            train=True)
    return bce_loss(logits, batch['label'], batch['mask']), stats
  (loss, stats), (mlp_grads, row_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params['mlp'], unique_rows)
  return loss, stats, mlp_grads, row_grads


def sparse_apply(setup: Setup, state: TrainState, batch: Batch, stats, mlp_grads, unique_rows,
                 row_grads) -> TrainState:
  """optax on the MLPs; the row-wise optimizer on each table array's unique rows only.

  The update starts from the rows the forward pass gathered: each touched row is read from the
  table once per step. (Left to itself, XLA:CPU fuses that gather into every consumer, and the
  step then reads the table once per use.)
  """
  updates, opt_state = setup.tx.update(mlp_grads, state.opt_state, state.params['mlp'])
  mlp = optax.apply_updates(state.params['mlp'], updates)
  tables, table_opt_state = {}, {}
  for name, table in state.params['tables'].items():
    unique_ids, grads, rows = batch['unique_ids'][name], row_grads[name], unique_rows[name]
    if setup.merge_across_processes:
      # Ids repeated across processes are merged here, so the gathered rows no longer line up.
      unique_ids, grads = optimizers.dedup_rows(unique_ids, grads, table.shape[0])
      rows = None
    tables[name], table_opt_state[name] = setup.row_tx.update(
        table, state.table_opt_state[name], unique_ids, grads, rows)
  params = {'mlp': mlp, 'tables': tables}
  return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                       opt_state=opt_state, table_opt_state=table_opt_state)


def train_step(setup: Setup, state: TrainState, batch: Batch):
  """One optimisation step; returns the new state and the batch's mean loss."""
  if setup.row_tx is None:
    loss, stats, grads = dense_grads(setup, state, batch)
    return dense_apply(setup, state, stats, grads), loss
  unique_rows = lookup(state.params['tables'], batch)
  loss, stats, mlp_grads, row_grads = sparse_grads(setup, state, batch, unique_rows)
  return sparse_apply(setup, state, batch, stats, mlp_grads, unique_rows, row_grads), loss


def eval_step(setup: Setup, state: TrainState, batch: Batch):
  """Click probabilities, with the labels and mask they belong to (replicated for the host)."""
  logits, _ = forward(setup, state.params['mlp'], state.batch_stats, batch,
                      lookup(state.params['tables'], batch), train=False)
  return jax.nn.sigmoid(logits), batch['label'], batch['mask']


BATCH_KEYS = ('label', 'dense', 'mask', 'unique_ids', 'entry_index', 'entry_weight',
              'entry_segment')  # models.UniqueRows' output


def batch_sharding(mesh: Mesh) -> Dict[str, NamedSharding]:
  """Where a prepared batch lives, as a pytree prefix of it (one sharding per key).

  Per-row and per-entry arrays are split over 'data'. The unique ids, which every device
  gathers, are replicated in one process, and one block per process (each process's own list)
  with several.
  """
  by_row = NamedSharding(mesh, P('data'))
  shardings = {k: by_row for k in BATCH_KEYS}
  if jax.process_count() == 1:
    shardings['unique_ids'] = NamedSharding(mesh, P())
  return shardings


def jit_on_batches(fun: Callable, mesh: Mesh, state_sharding: Any = None, **kwargs) -> Callable:
  """jax.jit of fun(state, batch, ...), taking its batch as `step_batches` yields it.

  In one process those are numpy arrays: with the batch's in_shardings given, the jitted call
  copies them over in its C++ dispatch, in about a third of the host time of a jax.device_put
  (mostly Python per array, seven arrays a batch; `experiments/data_benchmark.py
  --only=transfer`). Arrays already placed so are taken as they are.
  """
  return jax.jit(fun, in_shardings=(state_sharding, batch_sharding(mesh)), **kwargs)


def compile_train_step(setup: Setup, state: TrainState, op_fusion: bool) -> Callable:
  """The jitted step. With op_fusion the whole step (lookup, forward, backward, optimizers,
  scatter) is one XLA program that XLA fuses end to end; without it, each stage is its own
  jitted program and the host dispatches them in turn, so no fusion crosses a stage boundary
  (the analogue of running the reference without its graph-level op fusion)."""
  replicated = NamedSharding(setup.mesh, P())
  state_sharding = state_shardings(state, setup.mesh)
  if op_fusion:
    return jit_on_batches(functools.partial(train_step, setup), setup.mesh, state_sharding,
                          out_shardings=(state_sharding, replicated), donate_argnums=0)
  # Stage by stage, the batch is placed once, not copied again by each stage's call.
  place = functools.partial(jax.device_put, device=batch_sharding(setup.mesh))
  if setup.row_tx is None:
    grads_fn = jax.jit(functools.partial(dense_grads, setup))
    apply_fn = jax.jit(functools.partial(dense_apply, setup), donate_argnums=0)

    def staged_dense(state, batch):
      batch = place(batch)
      loss, stats, grads = grads_fn(state, batch)
      return apply_fn(state, stats, grads), loss
    return staged_dense
  gather_fn = jax.jit(lookup)
  grads_fn = jax.jit(functools.partial(sparse_grads, setup))
  apply_fn = jax.jit(functools.partial(sparse_apply, setup), donate_argnums=0)

  def staged_sparse(state, batch):
    batch = place(batch)
    unique_rows = gather_fn(state.params['tables'], batch)
    loss, stats, mlp_grads, row_grads = grads_fn(state, batch, unique_rows)
    return apply_fn(state, batch, stats, mlp_grads, unique_rows, row_grads), loss
  return staged_sparse


# ------------------------------------------------------------------------------------------------
# The loop.

# Batches staged ahead of the step under smartstaged (the prefetch queue's size).
STAGED_BATCHES = 3


def step_batches(batches: Iterator[Dict[str, np.ndarray]], setup: Setup,
                 smartstaged: bool) -> Iterator[Batch]:
  """Host batches -> deduplicated ids -> batches for the functions of `jit_on_batches`.

  In one process these are numpy arrays, which the jitted step copies over itself; with several
  processes each holds only its share, and they become global arrays on the mesh here. With
  `smartstaged` the reading and dedup run in a background thread, staged ahead of the step that
  consumes them.
  """
  unique_rows = None
  multi_process = jax.process_count() > 1
  shardings = batch_sharding(setup.mesh)

  def prepare(batch):
    nonlocal unique_rows
    if unique_rows is None:
      unique_rows = models.UniqueRows(
          setup.spec, setup.emb_fusion, process_index=jax.process_index(),
          process_count=jax.process_count(), local_batch=len(batch['label']),
          data_devices=setup.mesh.shape['data'] // jax.process_count())
    batch = unique_rows(batch)
    if multi_process:
      return {k: jax.tree.map(functools.partial(jax.make_array_from_process_local_data,
                                                shardings[k]), v) for k, v in batch.items()}
    return batch

  if smartstaged:
    return input_pipeline.prefetch(batches, size=STAGED_BATCHES, transform=prepare)
  return map(prepare, batches)


def make_eval_step(setup: Setup) -> Callable:
  return jit_on_batches(functools.partial(eval_step, setup), setup.mesh,
                        out_shardings=NamedSharding(setup.mesh, P()))


def first_eval_batch(setup: Setup, config, data: data_sources.DataFiles) -> Batch:
  """The first eval batch as `evaluate` will prepare it (its shapes, for compiling ahead).

  Raises a DataError when it holds no row (eval batches are full but for the last, so then no
  eval row is left, e.g. every one was bad and `skip_bad_rows` dropped it): before training,
  not after it.
  """
  stats = input_pipeline.ParseStats()
  error = first = None
  try:
    host = data_sources.eval_batches(config, setup.spec, data, stats=stats, compact=True)
    try:
      first = next(host, None)
    finally:
      if hasattr(host, 'close'):
        host.close()  # a generator's readers and parse workers stop here
  except Exception as e:  # pylint: disable=broad-except
    error = e  # a bad row in one process's share: every process stops
  data_sources.fail_together(error, f'reading the eval rows of {data.eval_path}')
  batch = None if first is None else next(step_batches(iter([first]), setup, False))
  # The global mask's sum: with several processes one may hold no eval row of a tiny file.
  if batch is None or not int(jnp.sum(batch['mask'] > 0)):
    raise data_sources.raised_together(no_eval_rows_error(data, stats))
  return batch


def no_eval_rows_error(data: data_sources.DataFiles,
                       stats: input_pipeline.ParseStats) -> input_pipeline.DataError:
  where = (', '.join(s.describe() for s in data.eval_sources) if data.eval_sources
           else data.eval_path)  # the eval parts of the train files, or several eval files
  if stats.bad_rows:
    return row_cache.bad_rows_error(stats.as_dict(), where, data.eval_path,
                                    '; no good row is left to evaluate')
  return input_pipeline.DataError(f'{where}: no rows to evaluate')


def evaluate(setup: Setup, state: TrainState, config, data: data_sources.DataFiles,
             stats: input_pipeline.ParseStats, step: Optional[Callable] = None) -> Dict[str, float]:
  """Exact metrics over every eval row (padded batches are masked; every process runs the same
  number of batches). `step`: a `make_eval_step` compiled ahead, else one is made here."""
  step = step or make_eval_step(setup)
  batches = data_sources.eval_batches(config, setup.spec, data, stats=stats, compact=True)
  labels, probs = [], []
  for batch in step_batches(batches, setup, effective_options(config)['smartstaged']):
    p, y, mask = jax.device_get(step(state, batch))
    keep = mask > 0
    probs.append(p[keep])
    labels.append(y[keep] > 0.5)  # a byte a row, not float32's four
  if not labels or not sum(len(y) for y in labels):
    raise no_eval_rows_error(data, stats)
  values = metrics.classification_metrics(np.concatenate(labels), np.concatenate(probs))
  if math.isnan(values['auc']):
    logging.warning('eval AUC is undefined (NaN): all %d rows of %s have label %d',
                    values['num_examples'], data.eval_path, int(values['positive_rate'] > 0.5))
  return values


def global_parse_stats(stats: input_pipeline.ParseStats) -> input_pipeline.ParseStats:
  """The run's parse counts: each process counts its own share, so they are summed over the
  processes (source_lines, the lines of the files, is every process's already); the bad-row
  examples are this process's, plus a line naming the other processes that dropped rows.
  Collective: every process calls it, at the same point."""
  if jax.process_count() == 1:
    return stats
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = [f.name for f in dataclasses.fields(stats) if f.name != 'bad_row_examples']
  local = np.asarray([getattr(stats, n) for n in names], np.int64)
  # As int32 pairs: without jax_enable_x64 an int64 would be narrowed (1TB's 4.2B lines).
  every = np.asarray(multihost_utils.process_allgather(local.view(np.int32)))
  every = np.ascontiguousarray(every.reshape(jax.process_count(), -1)).view(np.int64)
  by_name = dict(zip(names, every.T))  # each counter's value on every process
  counts = {n: int(v.sum()) for n, v in by_name.items()}
  counts['source_lines'] = int(by_name['source_lines'].max())
  others = [p for p, bad in enumerate(by_name['bad_rows']) if bad and p != jax.process_index()]
  examples = list(stats.bad_row_examples)
  if others:
    examples.append(f'and bad rows on process {", ".join(map(str, others))}: its log names them')
  return input_pipeline.ParseStats(**counts, bad_row_examples=examples)


def parse_results(stats: input_pipeline.ParseStats) -> Dict[str, Any]:
  """What results.json (eval_results.json) reports of the rows read."""
  return {'rows_parsed': stats.rows, 'bad_rows': stats.bad_rows,
          'truncated_list_values': stats.truncated_values, 'parse_stats': stats.as_dict()}


def agree_on_workdir(workdir: str) -> str:
  """Process 0's run directory, on every process of a multi-process run.

  Each process names the default model_DLRM_<timestamp> from its own clock, so processes started
  on either side of a second would write (and collectively save) into two directories.
  """
  if jax.process_count() == 1:
    return workdir
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = workdir.encode()
  if len(encoded) > _MAX_WORKDIR_BYTES:
    raise ValueError(f'run directory path of {len(encoded)} bytes: at most {_MAX_WORKDIR_BYTES}')
  padded = np.zeros(_MAX_WORKDIR_BYTES, np.uint8)
  padded[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  agreed = bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).rstrip(b'\0').decode()
  if agreed != workdir:
    logging.info('run directory %s (process 0\'s; this process named %s)', agreed, workdir)
  return agreed


_MAX_WORKDIR_BYTES = 4096


def resolve_workdir(config) -> str:
  """The run directory as the reference names it: `checkpoint`, else output_dir/model_DLRM_<ts>
  (train_and_evaluate then makes a new training run's, as <ts>-1, <ts>-2... where that is
  taken: checkpoints.make_new_directory)."""
  if config.checkpoint:
    return config.checkpoint
  return os.path.join(config.output_dir, 'model_DLRM_' + time.strftime('%Y%m%d-%H%M%S'))


def steps_for(config, num_train_rows: int) -> int:
  """`steps`, or one epoch of the train file when it is 0 (the reference's default).

  An epoch is ceil(rows / batch_size) steps, as DeepRec counts it, so every row is trained on;
  batches run across epoch boundaries, so the last one is completed from the next epoch's order
  (DeepRec trains a short last batch instead, which would compile a second step).
  """
  if config.steps:
    return int(config.steps)
  if num_train_rows <= 0:
    raise input_pipeline.DataError('the train file has no rows')
  return -(-num_train_rows // config.batch_size)


@jax.jit
def all_finite(tree) -> jax.Array:
  # x * 0 is 0 where x is finite and NaN where it is not, so one fused sum per leaf answers.
  # jnp.all(jnp.isfinite(x)) made XLA:CPU write a bool copy of each table first (300 MB for
  # Criteo's) before every checkpoint.
  return jnp.isfinite(sum(jnp.sum(x * 0) for x in jax.tree.leaves(tree)))


def state_bytes(state) -> int:
  """Bytes of every array of `state`, which may be abstract (ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def check_run_directory(workdir: str) -> None:
  """Refuses a run directory that orbax cannot write to, or that is two directories: the
  checkpoint manager gets it absolute, normalized as text (checkpoints.make_manager), where the
  file system follows a link before its '..', and the run's checkpoints and its lock, config and
  results went one to each (a rerun started from step 0). Not resolved to one of them: in a
  multi-host run each host resolves links its own way. Each process checks its own name."""
  as_text, as_opened = os.path.abspath(workdir), os.path.realpath(workdir)
  try:  # orbax's tensorstore takes only UTF-8 paths: another failed at the first save
    as_text.encode('utf-8')  # with the working directory a relative one is in
  except UnicodeEncodeError as e:
    raise ValueError(f'run directory {as_text!r} is not valid UTF-8 ({e.reason} at byte '
                     f'{e.start}): checkpoints cannot be written there; rename it') from None
  if os.path.realpath(as_text) != as_opened:
    raise ValueError(f"run directory {workdir}: its '..' follows a symbolic link, so it is "
                     f'{as_opened} to the file system but {as_text} to the checkpoints; name '
                     "either without the '..'")
  if os.path.islink(as_text) and not os.path.exists(as_text):
    # Training failed in makedirs with a bare "[Errno 17] File exists".
    raise FileNotFoundError(f'run directory {workdir} is a symbolic link to '
                            f'{os.readlink(as_text)}, which does not exist: create that '
                            'directory, or name another run directory')


def _probe_writable(directory: str, what: str) -> None:
  """Writes and removes a file in `directory` (made first, as the run would make it)."""
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f'.write-probe-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise OSError(f'{what} {directory} is not writable: {e}') from e


def check_writable(workdir: str, state: TrainState, config, num_steps: int) -> None:
  """Fails before training when the run directory cannot hold the run's checkpoints, or the
  serving artifact's directory cannot be written (the export comes after training)."""
  _probe_writable(workdir, 'run directory')
  if config.export_dir and jax.process_index() == 0:
    serving.check_export_dir(config.export_dir, workdir)
    # export_model writes beside export_dir and renames into it.
    _probe_writable(os.path.dirname(os.path.abspath(config.export_dir)),
                    'the directory of export_dir')
  per_step = state_bytes(state)
  saves = num_steps // config.save_steps + 1 if config.save_steps else 1
  # orbax keeps up to keep_checkpoint_max steps (0: all of them) plus the one being written.
  kept = min(config.keep_checkpoint_max or saves, saves) + 1
  needed = per_step * kept
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise OSError(f'{workdir}: {free / 2**30:.2f} GiB free, checkpoints of this run need about '
                  f'{needed / 2**30:.2f} GiB ({per_step / 2**20:.0f} MiB per step x {kept})')


def _after_relu(layer: str) -> bool:
  """Whether a Dense layer's output goes through a ReLU: the MLPs' layers do; the logit and
  dcn's cross layers (cross_net/V_i, W_i) do not."""
  return layer.startswith(('bottom_mlp/', 'top_mlp/'))


def activation_stats(setup: Setup, state: TrainState, batch: Batch) -> Dict[str, jax.Array]:
  """Each Dense layer's output on a batch, for summaries: an MLP layer's after its ReLU
  (before batch norm), the others' as they are."""
  pooled = models.embed(lookup(state.params['tables'], batch), batch, setup.spec,
                        setup.emb_fusion)
  _, variables = setup.model.apply(
      {'params': state.params['mlp'], 'batch_stats': state.batch_stats}, batch['dense'], pooled,
      train=False, capture_intermediates=lambda mdl, name: isinstance(mdl, nn.Dense))
  outputs = {}
  for path, value in jax.tree_util.tree_flatten_with_path(variables['intermediates'])[0]:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path[:-2])
    outputs[name] = jax.nn.relu(value) if _after_relu(name) else value
  return outputs


def write_activation_summaries(writer, step: int, activations) -> None:
  activations = jax.device_get(activations)
  # The share of a ReLU's outputs at zero (dead units); elsewhere zero is no special value.
  writer.write_scalars(step, {f'zero_fraction/{k}': float(np.mean(v == 0))
                              for k, v in activations.items() if _after_relu(k)})
  writer.write_histograms(step, {f'activations/{k}': np.asarray(v, np.float32).ravel()
                                 for k, v in activations.items()})


# What evaluation, prediction and export read of a state: not the optimizer's slots.
INFERENCE_PARTS = ('step', 'params', 'batch_stats')


def restorable(setup: Setup, inference: bool = False):
  """The abstract tree a checkpoint is restored into: the whole train state, or for inference
  a dict of its INFERENCE_PARTS, so that the slots (two copies of the tables under adam) are
  neither read nor required to fit: a run evaluates under any optimizer settings."""
  abstract = abstract_train_state(setup)
  return {k: getattr(abstract, k) for k in INFERENCE_PARTS} if inference else abstract


def checkpoint_setup(manager, setup: Setup, config, workdir: str,
                     inference: bool = False) -> Setup:
  """The setup whose state the newest checkpoint in `manager` holds (or `setup` if there is none).

  That is `setup` itself, or `setup` with the other emb_fusion layout: emb_fusion is an
  acceleration, as in DeepRec, and a run may turn it on or off when it resumes (restore_state
  re-lays the tables). Anything else that changes the state's shapes (of its INFERENCE_PARTS,
  with `inference`) is refused here, before the run writes anything.
  """
  parts = INFERENCE_PARTS if inference else None
  resized = spec_changes(workdir, setup.spec) if manager.latest_step() is not None else []
  problems = checkpoints.misfits(manager, restorable(setup, inference), parts)
  if not problems and not resized:
    return setup
  other = dataclasses.replace(setup, emb_fusion=not setup.emb_fusion)
  if not resized and not checkpoints.misfits(manager, restorable(other, inference), parts):
    return other
  checkpoints.refuse(manager, problems + resized, config, workdir)


def spec_changes(workdir: str, spec: fs.FeatureSpec) -> List[str]:
  """How `spec` would read rows into other table rows than the run's config.json says it did.

  An id's row is its hash modulo the table's rows, and tables are padded to a multiple of 64
  rows: hash_buckets 1000 -> 1003 keeps every array's shape, and the checkpoint would restore
  with each id looking up another id's row. Likewise a Criteo run trained when empty fields were
  dropped (config.json without criteo_missing) would look up rows it never trained for them, and
  lists cut at another max_list_len would pool other rows. [] when config.json cannot say.
  """
  saved = checkpoints.saved_config(workdir)
  if saved is None:
    return []
  try:
    saved_spec = fs.from_args(saved['feature_spec'], saved['hash_buckets'],
                              saved['embedding_dim'], saved['max_list_len'],
                              saved.get('criteo_table_rows') or (),
                              saved.get('criteo_missing', ''))
  except (ValueError, KeyError, TypeError):
    return []
  rows = {t.name: t.rows for t in saved_spec.tables}
  changed = [f'{t.name}: {rows[t.name]} saved, {t.rows} now' for t in spec.tables
             if rows.get(t.name, t.rows) != t.rows]
  problems = [f'{len(changed)} table(s) of another row count (first: {changed[0]})'
              ] if changed else []
  was = {c.name: c.default for c in saved_spec.columns}
  now = {c.name: c.default for c in spec.columns}
  if spec.name == 'criteo' and was.get('C1', now['C1']) != now['C1']:
    problems.append(f'empty categorical fields read as {was["C1"]!r} in training, '
                    f'{now["C1"]!r} now: --config.criteo_missing={was["C1"]!r} reads them as '
                    'the run was trained')
  # A list is pooled over its first max_list_len values: another cut pools other rows.
  was_cut = {f.column: f.max_len for f in saved_spec.sparse if f.is_list}
  now_cut = {f.column: f.max_len for f in spec.sparse if f.is_list}
  if now_cut and was_cut != now_cut:
    problems.append(f'lists pooled over their first {saved["max_list_len"]} values in training, '
                    f'{max(now_cut.values())} now: --config.max_list_len='
                    f'{saved["max_list_len"]} reads them as the run was trained')
  return problems


def restore_state(manager, setup: Setup, saved: Setup, inference: bool = False) -> TrainState:
  """The newest checkpoint as a state of `setup`'s layout; `saved` is its own (checkpoint_setup).
  With `inference`, only its INFERENCE_PARTS are read, and the slots are None.

  A checkpoint of the other emb_fusion layout is restored as it is and then re-laid: the
  tables and their optimizer slots are held twice while that runs, once per resume.
  """
  abstract = restorable(setup, inference)
  if saved.emb_fusion == setup.emb_fusion:
    restored = checkpoints.restore_latest(manager, abstract, partial=inference)
  else:
    restored = checkpoints.restore_latest(manager, restorable(saved, inference),
                                          partial=inference)
    logging.info('re-laying the checkpoint\'s tables from emb_fusion=%s to emb_fusion=%s',
                 saved.emb_fusion, setup.emb_fusion)
    relayout = jax.jit(functools.partial(models.relayout_tables, spec=setup.spec,
                                         emb_fusion=setup.emb_fusion),
                       out_shardings=jax.tree.map(lambda x: x.sharding, abstract))
    restored = relayout(restored)
  if inference:
    return TrainState(**restored, opt_state=None, table_opt_state=None)
  return restored


# The fields that decide which rows make batch k of a run; the rest may change on a resume
# without touching the data order.
DATA_ORDER_FIELDS = ('data_location', 'train_files', 'split_parts', 'eval_parts', 'batch_size',
                     'seed', 'shuffle_buffer', 'cache_block_rows', 'use_cache', 'tfds_data_dir',
                     'skip_bad_rows', 'max_list_len', 'planted')


def decay_step_change(config, workdir: str) -> List[str]:
  """Why an adagraddecay run cannot resume with another accumulator_decay_step ([] if it can).

  Each row's slot holds the decay periods it has had, counted in steps of the run's
  accumulator_decay_step: under another step every row would take dozens of decays at its next
  touch, while the MLPs' dense accumulators take at most one.
  """
  saved = checkpoints.saved_config(workdir) or {}
  if config.optimizer != 'adagraddecay' or saved.get('optimizer') != 'adagraddecay':
    return []

  def decay_step(hparams):
    value = (hparams or {}).get('accumulator_decay_step')
    return optimizers.DECAY_STEP if value is None else int(value)

  was, now = decay_step(saved.get('optimizer_hparams')), decay_step(config.optimizer_hparams)
  if was == now:
    return []
  return [f'adagraddecay accumulated with accumulator_decay_step={was}, {now} now: '
          f'--config.optimizer_hparams.accumulator_decay_step={was} resumes it']


def log_changed_settings(config, workdir: str, start_step: int) -> None:
  """Names every setting that differs from the run's last invocation (its config.json).

  A resume takes the new values, including a config file's default for an override left off
  the command line: a learning rate set by the first invocation's flag went back to the
  default without a word. `checkpoint` only names the run directory, which is the same.
  """
  saved = checkpoints.saved_config(workdir)
  if saved is None:
    return
  current = json.loads(config.to_json_best_effort())
  changes = [line for line in checkpoints.config_differences(saved, current)
             if not line.startswith('checkpoint:')]
  if changes:
    logging.warning('resuming at step %d with settings changed since the last invocation '
                    '(%s): %s', start_step, os.path.join(workdir, 'config.json'),
                    '; '.join(changes))


def warn_if_data_order_changes(config, workdir: str, start_step: int) -> None:
  """Warns when a resume changes what decides the data order (config.json has the run's).

  A resumed run goes on at batch `start_step` of its config's order, which continues the
  checkpointed run's exactly only when that order is the same; otherwise the rest of the epoch
  may repeat some rows and skip others (DeepRec restarts its input at every resume).
  """
  saved = checkpoints.saved_config(workdir)
  if saved is None:
    return
  current = json.loads(config.to_json_best_effort())

  def order_fields(c):  # each process reads its share of the rows: their count matters too
    fields = dict({k: c[k] for k in DATA_ORDER_FIELDS if k in c},
                  num_processes=c.get('distributed', {}).get('num_processes', 1))
    if 'planted' in fields:  # the data set it makes: unset fields are the generator's defaults
      fields['planted'] = data_sources.planted_parameters(
          fields['planted'], c.get('feature_spec', 'elm')) or fields['planted']
    if not fields.get('split_parts'):
      fields.pop('eval_parts', None)  # it cuts the train file only into split_parts
    return fields

  changes = checkpoints.config_differences(order_fields(saved), order_fields(current))
  if changes:
    logging.warning(
        'resuming at step %d with another data order (%s): training goes on at batch %d of the '
        'new order, so the rest of this epoch may repeat some rows and skip others',
        start_step, '; '.join(changes), start_step)


# What `evaluate` returns, by name; results.json has them as eval_<name>.
EVAL_METRICS = ('auc', 'accuracy', 'logloss', 'num_examples', 'positive_rate')


def earlier_results(workdir: str) -> Optional[Dict[str, Any]]:
  """The run's results.json as the last invocation wrote it; None if there is none (or it is
  not JSON)."""
  try:
    with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# What an invocation's training produced. One that trains no step (a rerun to export, or to
# evaluate again) keeps the last invocation's: its own would read as a run that took no time.
TRAINING_FIGURES = ('train_time_s', 'train_samples_per_s', 'checkpoint_saves',
                    'checkpoint_stall_s', 'eval_history', 'eval_during_training_s')
PARSE_FIGURES = ('rows_parsed', 'bad_rows', 'truncated_list_values', 'parse_stats')


def figures_kept_without_training(earlier: Optional[Dict[str, Any]], step: int,
                                  evaluated: bool) -> Dict[str, Any]:
  """What an invocation that trained no step at `step` takes from the last one's results
  (`earlier`): the training figures, and the evaluation's too when it did not evaluate again."""
  if not isinstance(earlier, dict) or earlier.get('steps') != step:
    return {}
  kept = {k: earlier[k] for k in TRAINING_FIGURES if k in earlier}
  if not evaluated:
    kept.update({k: v for k, v in earlier.items()
                 if k.startswith(('eval_', 'oracle_')) or k in PARSE_FIGURES})
  return kept


def evaluated_data(data: data_sources.DataFiles) -> List[str]:
  """The eval rows' files (and parts of files), as results.json names them."""
  return [source.describe() for source in data.eval_sources] or [data.eval_path]


def earlier_eval_history(workdir: str, start_step: int, eval_every: int,
                         num_steps: int) -> List[Dict[str, Any]]:
  """The evaluations during training of the invocations before this one, up to the checkpoint
  it resumes from, as the last one's results.json has them ([] if it has none).

  results.json is written anew by each invocation: without these, a resumed or re-run run's
  eval_history lost the evaluations of the steps it did not train itself. The last
  invocation's final evaluation counts too where an uninterrupted run would have evaluated at
  that step during training, so that the history is the same either way. (An invocation that
  crashed wrote no results.json: its evaluations are in its TensorBoard summaries only.)
  """
  earlier = earlier_results(workdir)
  try:
    history = list(earlier.get('eval_history') or [])
  except (AttributeError, TypeError):  # none yet, or not one of ours
    return []
  step = earlier.get('steps')
  if (eval_every and step == start_step < num_steps and step % eval_every == 0
      and 'eval_auc' in earlier
      and not any(isinstance(h, dict) and h.get('step') == step for h in history)):
    history.append({'step': step, **{k: earlier[f'eval_{k}'] for k in EVAL_METRICS
                                     if f'eval_{k}' in earlier}})
  return [h for h in history
          if isinstance(h, dict) and isinstance(h.get('step'), int) and h['step'] <= start_step]


def input_kind_changes(workdir: str, names: Sequence[str]) -> List[str]:
  """How reading the files `names` (paths, names or patterns) would feed the run's model another
  encoding of the same values than it trained on: TorchRec's .npy triples (ids modulo the
  tables, TorchRec's dense transform) against text files (hashed strings, log(x + 1)), or the
  reverse ([] if not; also when the run's config.json cannot say)."""
  saved = checkpoints.saved_config(workdir)
  if saved is None:
    return []
  def triples(files):  # a run reads one kind (data_sources.resolve): one name tells
    return any(torchrec_npy.is_npy_source(n.strip()) for n in files if n.strip())
  was, now = triples(str(saved.get('train_files', '')).split(',')), triples(names)
  if was == now:
    return []
  kind = {True: "TorchRec's .npy triples", False: 'text files'}
  return [f'the run trained on {kind[was]}, and {kind[now]} would be read now '
          f'({", ".join(os.path.basename(n) for n in names if n.strip()) or "the default files"}): '
          'they encode the same values as other ids and dense inputs']


def eval_data_changes(config, workdir: str) -> List[str]:
  """Why eval mode would write and score other planted rows than the run trained on ([] if
  not; also when the run's config.json cannot say).

  With data_location empty the planted data are written from config.planted when the files
  there are not of those settings: an evaluator without the run's --config.planted overrides
  (or without its data_location) would replace the run's files, which its trainer may still be
  reading, and report the AUC of another data set's rows.
  """
  saved = checkpoints.saved_config(workdir)
  if config.data_location or saved is None:
    return []
  if saved.get('data_location'):
    flags = ' '.join(f'--config.{k}={shlex.quote(str(v))}'
                     for k, v in _eval_data_fields(saved).items() if v != config.get(k))
    return [f'the run trained on data_location={saved["data_location"]!r}, this command names '
            f'none (planted data): {flags} evaluates on the run\'s data']
  # Compared with the generator's defaults filled in: a field one config leaves out may be set
  # to another value by the other.
  was = data_sources.planted_parameters(saved.get('planted') or {}, config.feature_spec)
  now = data_sources.planted_parameters(config.planted.to_dict(), config.feature_spec)
  if was is None or now is None:
    return []
  return [f'the run\'s planted data were written with planted.{k}={json.dumps(was[k])}, this '
          f'command has {json.dumps(now[k])}: --config.planted.{k}={json.dumps(was[k])} '
          'evaluates on them' for k in sorted(was) if was[k] != now.get(k)]


def _eval_data_fields(saved: Dict[str, Any]) -> Dict[str, Any]:
  """The fields of a run's config.json that say which files its evaluation read."""
  names = ['data_location', 'eval_files', 'tfds_data_dir']
  if saved.get('split_parts'):  # the eval rows are the train files' last parts
    names += ['train_files', 'split_parts', 'eval_parts']
  return {k: saved[k] for k in names if k in saved}


def restore_for_inference(setup: Setup, config, workdir: str) -> TrainState:
  # Checked before make_manager, which would create the directory: a mistyped run directory
  # leaves nothing behind.
  has_steps = os.path.isdir(os.path.join(workdir, 'checkpoints')) and any(
      name.isdigit() for name in os.listdir(os.path.join(workdir, 'checkpoints')))
  manager = checkpoints.make_manager(workdir, config) if has_steps else None
  if manager is not None and manager.latest_step() is None:
    manager.close()
    manager = None
  if manager is None:
    runs = sorted(glob.glob(os.path.join(glob.escape(config.output_dir), '*', 'checkpoints',
                                         '[0-9]*')),
                  key=os.path.getmtime, reverse=True)
    newest = os.path.dirname(os.path.dirname(runs[0])) if runs else None
    raise FileNotFoundError(
        f'mode={config.mode} needs a checkpoint in {workdir}/checkpoints, and there is none; '
        'train first, or name the run with --config.checkpoint (or --workdir)'
        + (f'; the newest run under {config.output_dir} is {newest}' if newest else ''))
  # Closed when done: an open manager keeps its threads and metadata stores for the life of a
  # process that evaluates or predicts many times.
  try:
    saved = checkpoint_setup(manager, setup, config, workdir, inference=True)
    return restore_state(manager, setup, saved, inference=True)
  finally:
    manager.close()


def predict(setup: Setup, state: TrainState, config, input_path: str, output_path: str) -> int:
  """Writes one click probability per row of `input_path`, in row order; returns the count.

  The rows may lack the label column (`input_pipeline.scoring_spec`). One process only (see
  train_and_evaluate).
  """
  step = make_eval_step(setup)
  spec = input_pipeline.scoring_spec([input_path], setup.spec)
  if not spec.label:
    logging.info('%s: rows without the label column %r', input_path, setup.spec.label)
  batches = input_pipeline.batches(
      [input_path], spec, config.eval_batch_size, drop_remainder=False, skip_bad_rows=False,
      num_workers=data_sources.parse_workers(config, input_pipeline.expand_paths([input_path])))
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  tmp = f'{output_path}.tmp-{os.getpid()}'
  count = 0
  try:
    with open(tmp, 'w') as f:
      for batch in step_batches(batches, setup, effective_options(config)['smartstaged']):
        probs, _, mask = jax.device_get(step(state, batch))
        probs = probs[mask > 0]
        f.write(''.join(f'{p:.8g}\n' for p in probs))
        count += len(probs)
    os.replace(tmp, output_path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, input_pipeline.DataError) and not spec.label and 'fields, expected' in str(e):
      # A labelled row after a first line without the label: say where the form was decided.
      raise input_pipeline.DataError(
          f'{e} (the first line of {input_path} has one field fewer than the '
          f'{setup.spec.name} columns, so every row is read without the label column '
          f'{setup.spec.label!r})', e.path, e.line, e.column) from None
    raise
  return count


def check_predict_output(input_path: str, output_path: str) -> None:
  """Fails before anything is restored or scored on a missing input, on an output that cannot
  take the scores, or on one that is an input file: its rows would be replaced by their
  probabilities."""
  inputs = input_pipeline.expand_paths([input_path])
  # A TorchRec triple's other two files are inputs too.
  inputs += [c for i in inputs if torchrec_npy.is_npy_source(i)
             for c in torchrec_npy.companion_paths(i) if os.path.exists(c)]
  if os.path.isdir(output_path):
    raise ValueError(f'config.predict_output={output_path!r} is a directory: name a file')
  if os.path.exists(output_path) and any(os.path.samefile(i, output_path) for i in inputs):
    raise ValueError(f'config.predict_output={output_path!r} is the input file '
                     f'(config.predict_input={input_path!r}): it would be overwritten')
  # The nearest existing directory decides: nothing is created before the checkpoint is found
  # (with the default output in the run directory, a mistyped one would be made).
  parent = os.path.dirname(os.path.abspath(output_path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise PermissionError(f'config.predict_output={output_path!r}: {parent} is not a writable '
                          'directory')


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: Optional[str] = None) -> Dict[str, Any]:
  """Runs `config.mode`: train (then evaluate), eval of the newest checkpoint, or predict.

  Training resumes from the newest checkpoint in `workdir`. Without one, the run directory is
  the config's `checkpoint`, else a new output_dir/model_DLRM_<timestamp> (resolve_workdir).
  """
  input_pipeline.refuse_while_a_process_starts('train_and_evaluate')
  check_config(config)
  log_overridden_settings(config)
  new_run = not workdir and not config.checkpoint
  workdir = workdir or resolve_workdir(config)
  set_cpu_dispatch(config)
  initialize_distributed(config)
  with stopping_together():
    return _train_and_evaluate(config, workdir, new_run)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        new_run: bool) -> Dict[str, Any]:
  # After joining: a process refusing alone (its file system's links) stops the others too.
  data_sources.agreeing('checking the run directory', check_run_directory, workdir)
  warn_if_bf16_is_emulated(config)
  logging.info('JAX process %d / %d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  setup = make_setup(config)
  if config.mode == 'predict':
    # Every process would read the whole file as its share of the global batch and write each
    # row twice; a multi-process run's checkpoint restores into one process instead.
    if jax.process_count() > 1:
      raise data_sources.raised_together(ValueError(
          f'mode=predict runs in a single process, not {jax.process_count()}: run it without '
          'config.distributed (the checkpoint restores onto one host)'))
    return _releasing_state_on_failure(run_prediction, setup, config, workdir)
  made = new_run and config.mode == 'train'
  if made:  # process 0 names the directory (agree_on_workdir); a refusal stops every process
    workdir = data_sources.agreeing(
        'making the run directory',
        checkpoints.make_new_directory if jax.process_index() == 0 else os.fspath, workdir)
  workdir = agree_on_workdir(workdir)
  if config.mode == 'eval':
    return _releasing_state_on_failure(run_evaluation, setup, config, workdir)
  with contextlib.ExitStack() as locked:
    # Process 0 alone takes the lock: refused (RunDirectoryInUse), it stops the others here, not
    # in their first collective after JAX's 5-minute shutdown timeout.
    data_sources.agreeing("taking the run directory's lock", locked.enter_context,
                          checkpoints.training_lock(workdir, made=made))
    try:
      return _releasing_state_on_failure(run_training, setup, config, workdir)
    except checkpoints.Preempted as stop:
      # A stop is not a failure. Its traceback would keep run_training's frame (the state, the
      # input thread, the open row cache) alive for as long as a notebook keeps the last
      # exception: beside the resumed run's state.
      raise stop.with_traceback(None) from None


def _releasing_state_on_failure(run: Callable[..., Dict[str, Any]], *args) -> Dict[str, Any]:
  """run(*args). A bad file or a full disk keeps its whole traceback, but its frames let go of
  the state, which a notebook's last exception kept alive beside the next run's."""
  try:
    return run(*args)
  except (input_pipeline.DataError, OSError) as e:
    _clear_frames(e)
    raise


def run_prediction(setup: Setup, config, workdir: str) -> Dict[str, Any]:
  """mode=predict: the click probability of every row of predict_input, one per line."""
  output = config.predict_output or os.path.join(workdir, 'predictions.txt')
  check_predict_output(config.predict_input, output)
  changes = input_kind_changes(workdir, input_pipeline.expand_paths([config.predict_input]))
  if changes:
    raise ValueError(f'mode=predict of {workdir}: {changes[0]}. Nothing was written.')
  state = restore_for_inference(setup, config, workdir)
  count = predict(setup, state, config, config.predict_input, output)
  logging.info('wrote %d probabilities to %s', count, output)
  return {'predictions': count, 'predict_output': output}


def run_evaluation(setup: Setup, config, workdir: str) -> Dict[str, Any]:
  """mode=eval: the newest checkpoint's metrics on the eval rows, into eval_results.json."""
  # The checkpoint first: a mistyped run directory fails before the data are generated or
  # cached (minutes for the default planted data).
  state = restore_for_inference(setup, config, workdir)
  changes = eval_data_changes(config, workdir)
  if changes:
    raise ValueError(f'mode=eval of {workdir}: ' + '; '.join(changes) + '. Nothing was written.')
  with contextlib.closing(data_sources.resolve(config, setup.spec, train=False,
                                               need_train_files=False)) as data:
    changes = input_kind_changes(workdir, [s.path for s in data.eval_sources])
    if changes:
      raise ValueError(f'mode=eval of {workdir}: {changes[0]}. Nothing was written.')
    results = {'steps': int(state.step), **data.oracle}
    stats = input_pipeline.ParseStats()
    results.update({f'eval_{k}': v
                    for k, v in evaluate(setup, state, config, data, stats).items()})
    results['eval_data'] = evaluated_data(data)
  results.update(parse_results(global_parse_stats(stats)))
  print(f"ACC = {results['eval_accuracy']:.6f}\nAUC = {results['eval_auc']:.6f}")
  if jax.process_index() == 0:
    for what, write in (
        ('eval_results.json',
         lambda: write_results(os.path.join(workdir, 'eval_results.json'), results)),
        ('the eval summaries', lambda: write_eval_summaries(workdir, results))):
      try:
        write()
      except OSError as e:  # a run evaluated where it cannot be written (a read-only mount)
        logging.warning('%s not written (%s): the figures are the ones above', what, e)
  return results


def eval_scalars(metrics: Dict[str, Any], prefix: str = '') -> Dict[str, float]:
  """The eval_* TensorBoard scalars from `metrics` (keys `prefix + 'auc'` and so on)."""
  return {f'eval_{k}': metrics[prefix + k] for k in ('auc', 'accuracy', 'logloss')}


def write_eval_summaries(workdir: str, results: Dict[str, Any]) -> None:
  """mode=eval's metrics as TensorBoard scalars at the checkpoint's step, in `<run>/eval`: where
  DeepRec's script and TensorFlow's evaluators write theirs, a TensorBoard run of its own beside
  the trainer's (whose evaluations stay in the run directory)."""
  writer = metric_writer.MetricWriter(os.path.join(workdir, 'eval'), start_step=None)
  try:
    writer.write_scalars(results['steps'], eval_scalars(results, 'eval_'))
  finally:
    writer.close()


def _clear_frames(error: BaseException) -> None:
  """The locals of the frames of `error`'s traceback, and of the errors it chains, released."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    traceback.clear_frames(error.__traceback__)
    error = error.__cause__ or error.__context__


def run_training(setup: Setup, config, workdir: str) -> Dict[str, Any]:
  """mode=train: resume or start, train (evaluating every eval_every_steps), save, evaluate,
  export and write results.json; the run's results."""
  # What a run opens is closed however it ends: a failed run in a notebook or a sweep left its
  # TensorBoard writer's threads and files open for the life of the process.
  with contextlib.ExitStack() as closing:
    return _run_training(setup, config, workdir, closing)


def _agreed(flag: bool) -> bool:
  """Process 0's `flag` on every process: where each process decides for itself (a run
  directory that is not on a shared disk), their collectives could come in different orders."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _run_training(setup: Setup, config, workdir: str,
                  closing: contextlib.ExitStack) -> Dict[str, Any]:
  options = effective_options(config)
  abstract = abstract_train_state(setup)
  # A resume is checked against its checkpoint before the data are read: a refused one (a
  # mistyped hash_buckets, say) cached the train files for its table sizes first. A new run
  # makes checkpoints/ only once its data and directory are found fit.
  manager, saved_setup, start_step = None, setup, 0
  if _agreed(os.path.isdir(os.path.join(workdir, 'checkpoints'))):
    manager = closing.enter_context(contextlib.closing(
        checkpoints.make_manager(workdir, config, training=True)))
    saved_setup = checkpoint_setup(manager, setup, config, workdir)
    start_step = manager.latest_step() or 0
    changed = (decay_step_change(config, workdir)
               + input_kind_changes(workdir, config.train_files.split(','))) if start_step else []
    if changed:
      checkpoints.refuse(manager, changed, config, workdir)
  data = closing.enter_context(contextlib.closing(data_sources.resolve(config, setup.spec)))
  num_steps = steps_for(config, data.train_rows)
  # Each process checks its own disk; before the checkpoint manager's barrier.
  data_sources.agreeing('checking the run directory and export_dir', check_writable, workdir,
                        abstract, config, num_steps)
  if manager is None:
    manager = closing.enter_context(contextlib.closing(
        checkpoints.make_manager(workdir, config, training=True)))
  if start_step:
    log_changed_settings(config, workdir, start_step)
    warn_if_data_order_changes(config, workdir, start_step)

  def open_writer():  # process 0 writes: its disk, before the first collective on the state
    opened = closing.enter_context(contextlib.closing(
        metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                   start_step=start_step)))
    opened.write_config(config)
    return opened

  writer = data_sources.agreeing("writing the run's config", open_writer)
  stats = input_pipeline.ParseStats()

  step_fn = compile_train_step(setup, abstract, options['op_fusion'])
  summarize = jit_on_batches(functools.partial(activation_stats, setup), setup.mesh)
  eval_fn = make_eval_step(setup)

  # Exactly num_steps - start_step batches on every process, from the row cache (or the CSV);
  # a resumed run continues the same data order without reading the rows it skips.
  host_batches = data_sources.train_batches(config, setup.spec, data, num_steps=num_steps,
                                            start_step=start_step, stats=stats, compact=True)
  batches = step_batches(host_batches, setup, options['smartstaged'])
  first = next(batches, None)
  if first is not None:
    # The finiteness check before each save too: compiled later, it would sit on the state.
    calls = [(step_fn, (abstract, first)), (all_finite, (abstract.params,))]
    if config.activation_summary_steps:
      calls.append((summarize, (abstract, first)))
    # Evaluation at the end too: compiled then, its compiler's leftovers would come on top of
    # the state (17 MiB of the Criteo run's peak). Its first batch is read now for the shapes.
    if not config.no_eval:
      calls.append((eval_fn, (abstract, first_eval_batch(setup, config, data))))
    compile_ahead(calls)
    batches = itertools.chain([first], batches)
  # A resumed run restores straight into the abstract state: no fresh state beside it.
  if start_step:
    state = restore_state(manager, setup, saved_setup)
    if int(state.step) != start_step:
      raise ValueError(f'the checkpoint at step {start_step} in {manager.directory} holds a state '
                       f'of step {int(state.step)}: it was not written by this trainer')
  else:
    state = create_train_state(init_key(config.seed), setup)

  if start_step >= num_steps:
    # As TF's Estimator: a run asked for fewer steps than its checkpoint holds trains none.
    logging.warning('the checkpoint in %s is at step %d, at or past steps=%d: nothing to train',
                    manager.directory, start_step, num_steps)
  else:
    logging.info('training to step %d from step %d (batch %d, %s)', num_steps, start_step,
                 config.batch_size, ', '.join(f'{k}={v}' for k, v in options.items()))
  pending_losses = []  # on device, fetched at log and save steps
  logged_losses = []  # fetched since the last log line, which reports their mean
  last_saved = manager.latest_step()
  save_stall, saves = 0.0, 0
  train_start = time.perf_counter()
  timed_steps, timed_since = 0, None
  profiler = metric_writer.Timeline(workdir, config.timeline, first_step=start_step + 10)
  progress = closing.enter_context(contextlib.closing(
      metric_writer.progress_bar(num_steps, start_step)))

  def last_good():
    if last_saved is None:
      return f'no checkpoint was saved before it (in {manager.directory})'
    return f'the last good checkpoint is step {last_saved} in {manager.directory} (left intact)'

  def check_losses(step):
    """Fetches the losses since the last check; stops the run at the first non-finite one."""
    values = np.asarray(jax.device_get(pending_losses))
    pending_losses.clear()
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise data_sources.raised_together(FloatingPointError(  # the global loss
          f'non-finite training loss at step {step - values.size + bad[0] + 1}; {last_good()}'))
    logged_losses.append(values)

  def check_params(step):
    """Stops the run before a save of non-finite parameters would replace a good checkpoint."""
    if not bool(all_finite(state.params)):
      raise data_sources.raised_together(FloatingPointError(
          f'non-finite parameters after step {step}; {last_good()}'))

  def save_before_failing(done, what):
    """Saves step `done` when reading data fails mid-run (a bad row found only now, with
    use_cache=False), so the steps since the last save are not lost. One process only: another
    process, whose rows parse, would not join the collective save."""
    if jax.process_count() != 1 or done == 0:
      return
    if done != last_saved:
      if not bool(all_finite(state.params)):
        return
      checkpoints.save(manager, done, state)
    # Also when step `done` is the periodic save still being written: the process is about to
    # exit, which would leave it half written.
    checkpoints.wait(manager)
    logging.error('%s failed after step %d (below); step %d is saved in %s, and the '
                  'command with --config.checkpoint=%s resumes from it once that is fixed',
                  what, done, done, manager.directory, workdir)

  def evaluate_during_training(step):
    """An evaluation every eval_every_steps: logged, kept for results.json, and its time kept
    out of the training rate."""
    nonlocal timed_since, eval_time
    start = time.perf_counter()
    try:
      # Its own parse counters: the eval rows are counted once, by the final evaluation.
      values = evaluate(setup, state, config, data, input_pipeline.ParseStats(), step=eval_fn)
    except Exception:
      save_before_failing(step, 'the evaluation')
      raise
    writer.write_scalars(step, eval_scalars(values))
    writer.flush()  # a resume from this step's checkpoint does not evaluate it again
    eval_history.append({'step': step, **values})
    spent = time.perf_counter() - start
    timed_since += spent
    eval_time += spent

  eval_every = 0 if config.no_eval else config.eval_every_steps
  eval_history = (earlier_eval_history(workdir, start_step, eval_every, num_steps)
                  if start_step else [])
  eval_time = 0.0
  stopped_at, stopped_by = None, ''  # the step of a preemption notice (SIGTERM) or Ctrl-C
  # A failure anywhere up to the final save lets a save still being written finish first (and
  # stops a trace in progress).
  with checkpoints.finished_on_failure(manager), contextlib.closing(profiler):
    with checkpoints.preemption_notices() as preempted:
      for step in range(start_step, num_steps):
        traced = profiler.seconds
        profiler.before_step(step)
        try:
          with preempted.waiting():
            batch = next(batches, None)
        except checkpoints.NoticeWhileWaiting as e:
          logging.warning('%s while waiting for the next batch: stopping after step %d', e.name,
                          step)
          stopped_at, stopped_by = step, e.name
          break
        except Exception:
          save_before_failing(step, 'reading the training data')
          raise
        if batch is None:
          logging.warning('train data ran out at step %d', step)
          break
        state, loss = step_fn(state, batch)
        pending_losses.append(loss)
        if step == start_step:
          jax.block_until_ready(loss)  # the first step compiles; time from the second on
          timed_since = time.perf_counter()
        else:
          timed_steps += 1
        profiler.after_step(step, loss)
        if timed_since is not None:
          timed_since += profiler.seconds - traced  # writing a trace is not training time
        done = step + 1
        log_now = done % config.log_every_steps == 0 or done == num_steps
        save_now = bool(config.save_steps) and done % config.save_steps == 0
        if log_now or save_now:
          check_losses(done)  # never checkpoint a state that has gone non-finite
        if log_now:
          mean_loss = float(np.concatenate(logged_losses).mean())  # every step since the last log
          logged_losses.clear()
          scalars = {'train_loss': mean_loss, 'learning_rate': config.learning_rate}
          elapsed = time.perf_counter() - timed_since
          rate = float('nan')
          if timed_steps and elapsed > 0:  # none yet on an invocation's first (compiling) step
            rate = scalars['train_samples_per_s'] = timed_steps * config.batch_size / elapsed
          writer.write_scalars(done, scalars)
          progress.update(done, loss=mean_loss, samples_per_s=rate)
        if config.activation_summary_steps and done % config.activation_summary_steps == 0:
          write_activation_summaries(writer, done, summarize(state, batch))
        if save_now:
          t = time.perf_counter()
          check_params(done)
          checkpoints.save(manager, done, state)
          # The summaries up to a checkpoint go to disk with it: a resume from it writes only
          # the steps after it, so unflushed ones would be lost for good by a kill.
          writer.flush()
          save_stall += time.perf_counter() - t
          saves += 1
          last_saved = done
        if eval_every and done % eval_every == 0 and done < num_steps:
          evaluate_during_training(done)
        stopped_by = preempted(done)
        if stopped_by:
          stopped_at = done
          break
    check_losses(int(state.step))
    jax.block_until_ready(state)
    train_time = time.perf_counter() - train_start - eval_time
    rate = (timed_steps * config.batch_size / (time.perf_counter() - timed_since)
            if timed_since and timed_steps else float('nan'))
    progress.close()
    profiler.close()
    final_step = int(state.step)
    # The steps' temporaries and the input thread's batches are freed now but still resident;
    # handed back, the save and the evaluation reuse pages instead of adding to the peak (-29 MiB
    # of the Criteo run's, which evaluation would otherwise set).
    return_freed_heap()
    if final_step != last_saved:
      # The losses were finite, but the last update may not have been (they come before it).
      check_params(final_step)
      checkpoints.save(manager, final_step, state)
      saves += 1
      last_saved = final_step
    writer.flush()
    # Waits for the saves in flight; nothing is saved after this point.
    manager.close()

  # checkpoint_stall_s: the periodic saves' time on the training loop (the final save's wait is
  # not training time).
  results = {'steps': final_step, 'train_time_s': train_time, 'train_samples_per_s': rate,
             'batch_size': config.batch_size, 'checkpoint_saves': saves,
             'last_checkpoint_step': last_saved, 'checkpoint_stall_s': save_stall,
             **{f'option_{k}': v for k, v in options.items()},
             'cpu_async_dispatch': jax.config.read('jax_cpu_enable_async_dispatch')}
  if stopped_at is not None:
    results['preempted_at_step'] = stopped_at
    results['preempted_by'] = stopped_by
  if eval_history:
    results['eval_history'] = eval_history  # the evaluations during training, by step
    results['eval_during_training_s'] = eval_time

  # Read before this invocation's results replace it.
  earlier = earlier_results(workdir) if final_step == start_step else None

  def record_results(parse_stats: input_pipeline.ParseStats):
    if 'eval_auc' in results:  # the oracle is the eval file's best: only beside its eval figures
      results.update(data.oracle)
    results.update(parse_results(parse_stats))
    # A failed evaluation does not keep an earlier one's figures beside its failure.
    results.update(figures_kept_without_training(
        earlier, final_step, 'eval_auc' in results or 'failed_after_training' in results))
    writer.close()
    if jax.process_index() == 0:
      write_results(os.path.join(workdir, 'results.json'), results)

  evaluate_now = not config.no_eval and stopped_at is None
  run_stats = None
  try:
    if evaluate_now:
      return_freed_heap()  # what the save freed
      eval_metrics = evaluate(setup, state, config, data, stats, step=eval_fn)
      results.update({f'eval_{k}': v for k, v in eval_metrics.items()})
      results['eval_data'] = evaluated_data(data)
    # The run's counts, summed over the processes while they are all here, before what only
    # process 0 does and may fail at alone (its summaries, the export's write).
    run_stats = global_parse_stats(stats)
    if evaluate_now:
      writer.write_scalars(final_step, eval_scalars(results, 'eval_'))
    if config.export_dir and stopped_at is None:
      triples = any(torchrec_npy.is_npy_source(s.path) for s in data.train_sources)
      results['export_dir'] = serving.export_model(
          setup, state, config.export_dir, fs.spec_args(config), workdir,
          input_encoding='torchrec_npy' if triples else 'text')
  except Exception as e:
    # A bad eval row found only now (parsing the CSV as it goes), or a failed export: the
    # training's figures (and the evaluation's) still go to results.json, beside its checkpoint.
    results['failed_after_training'] = f'{type(e).__name__}: {e}'[:2000]
    # Failed in the evaluation, the processes may not all have got this far: this one's counts.
    record_results(run_stats or stats)
    logging.error('training finished: step %d is saved in %s and its figures are in '
                  'results.json. What failed after it is below; once it is fixed, the command '
                  'with --config.checkpoint=%s evaluates that step without training again',
                  last_saved, manager.directory, workdir)
    raise
  record_results(run_stats)
  if stopped_at is not None:
    what = 'Ctrl-C (SIGINT)' if stopped_by == 'SIGINT' else f'preemption notice ({stopped_by})'
    raise checkpoints.Preempted(
        f'{what}: stopped after step {stopped_at} of {num_steps}, saved as checkpoint '
        f'{last_saved} in {manager.directory}; the same command with '
        f'--config.checkpoint={workdir} resumes from it')
  if evaluate_now:
    print(f"ACC = {results['eval_accuracy']:.6f}\nAUC = {results['eval_auc']:.6f}")
  return results


def write_results(path: str, results: Dict[str, Any]) -> None:
  """`results` to `path` (a .json file); what it replaces goes to `<name>_history.jsonl` first.

  A resumed run, or a second evaluation, then loses none of an earlier invocation's figures
  (a resume with no_eval would otherwise drop the earlier eval_auc). Never raises over the old
  file: the new results matter more than a damaged old one, which is kept as its text.
  """
  metrics.archive_previous(path, path[:-len('.json')] + '_history.jsonl', 'unreadable_results')
  metrics.write_json_atomic(path, results)
