r"""Memory planner: the bytes one device holds for a config on a ('data', 'model') mesh.

  python -m dlrm_jax.planner --config=configs/criteo_1tb_mlperf.py --devices=8 \
      [--mesh=1,8] --device_memory_gb=80

prints, per component, the bytes per device and over all devices, the total, and whether it fits
(FITS / DOES NOT FIT, with the headroom), then the largest data axis that would fit; it exits
with status 1 when the planned mesh does not fit, so that a launch script can check it. `plan()`
returns the same numbers as a `Plan`. Nothing is allocated: shapes come from the spec and from
`jax.eval_shape` of the real model and optimizer `init`s, so the numbers follow the code.

The layout planned, the one `train.py` uses on the mesh:
  * every embedding table array (one fused array under emb_fusion, else one per table) has its
    rows padded up to a multiple of ROW_PADDING and is split by rows over 'model'
    (P('model', None)), replicated over 'data'; its row-wise optimizer slots (adam/adamasync:
    mu, nu; adagrad: accumulator; adagraddecay: accumulator and an int32 [rows, 1] decay period;
    rowwise_adagrad: a [rows, 1] accumulator) have the same layout, scalar step counts are
    replicated;
  * the MLPs, their optimizer state and the batch-norm statistics are replicated;
  * the global batch is split over 'data'.

What is estimated rather than read off the code, per device:
  * step temporaries of the tables: on the sparse path the batch's unique rows (capacity for
    at most batch x slots per table array, with models.UniqueRows' headroom and steps) gathered,
    their gradient, and each optimizer slot's rows (and, with a data axis, a copy of
    adagraddecay's decay period); a full-table gradient on the dense path and for 'adam', which
    keeps TensorFlow's dense semantics;
  * activations: every layer's outputs from the layer widths (Dense and ReLU outputs, batch norm,
    the interaction's inputs, Gram matrix and output), x 2 in training for the values saved for
    the backward pass and their gradients; MLP activations in the compute dtype (bf16 halves
    them), looked-up and pooled embedding rows, the `dot` interaction's stacked features and
    Gram matrix (as under DeepRec's bf16) and `dcn`'s cross layers in float32;
  * the batch: the step's batch plus those smartstaged keeps on the devices ahead of it.
XLA's own workspace and fragmentation are not counted: leave some headroom.

GB here is 10^9 bytes; an '80 GB' accelerator holds a little more, so the verdict errs on the
safe side.
"""

import copy
import dataclasses
import functools
import math
import sys
from typing import List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from dlrm_jax import cli
from dlrm_jax import models
from dlrm_jax import optimizers
from dlrm_jax import train

ROW_PADDING = models.ROW_MULTIPLE
# Row-wise optimizers that keep dense semantics: each step scatters the rows' gradients into a
# full-table gradient (optimizers._rowwise_dense_adam) instead of touching only those rows.
DENSE_ROWWISE_OPTIMIZERS = frozenset({'adam'})

GB = 10**9


@dataclasses.dataclass(frozen=True)
class Component:
  """One line of a plan: where it lives and its bytes on one device and on all of them."""
  name: str
  layout: str
  per_device: int
  total: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device of a training run of `config` on a (data, model) mesh."""
  num_devices: int
  mesh_shape: Tuple[int, int]          # (data, model)
  optimizer: str
  sparse_updates: bool
  table_rows: int                      # all tables, as the spec gives them
  stored_table_rows: int               # after padding each table array
  embedding_dim: int
  batch_size: int                      # global
  rows_per_device: int                 # batch_size / data
  batches_on_device: int               # the step's batch + those staged ahead
  # Bytes on each device.
  tables: int
  table_optimizer_state: int
  table_step_temporaries: int
  mlp_params: int                      # MLP parameters and batch-norm statistics
  mlp_optimizer_state: int
  activations: int
  batch: int

  @property
  def data(self) -> int:
    return self.mesh_shape[0]

  @property
  def model(self) -> int:
    return self.mesh_shape[1]

  @property
  def per_device(self) -> int:
    """Bytes one device needs (the plan's estimate)."""
    return sum(c.per_device for c in self.components())

  def headroom(self, device_memory_bytes: float) -> float:
    return device_memory_bytes - self.per_device

  def fits(self, device_memory_bytes: float) -> bool:
    return self.per_device <= device_memory_bytes

  def components(self) -> List[Component]:
    n, data, model = self.num_devices, self.data, self.model
    by_rows = f'rows / model ({model})'
    by_batch = f'batch / data ({data})'
    lines = [
        ('embedding tables', by_rows, self.tables),
        ('table optimizer state', by_rows, self.table_optimizer_state),
        ('table step temporaries',
         by_rows if self._full_table_gradient else 'unique rows, replicated',
         self.table_step_temporaries),
        ('MLP params + batch norm', 'replicated', self.mlp_params),
        ('MLP optimizer state', 'replicated', self.mlp_optimizer_state),
        ('activations (train)', by_batch, self.activations),
        (f'batch (x{self.batches_on_device} on device)', by_batch, self.batch),
    ]
    return [Component(name, layout, b, b * n) for name, layout, b in lines]

  @property
  def _full_table_gradient(self) -> bool:
    return not self.sparse_updates or self.optimizer in DENSE_ROWWISE_OPTIMIZERS


# ------------------------------------------------------------------------------------------------
# Shapes.

def resolve_mesh(mesh_shape: Sequence[int], num_devices: int) -> Tuple[int, int]:
  """(data, model) from a mesh shape whose data axis may be -1 (all remaining devices)."""
  if num_devices < 1:
    raise ValueError(f'devices must be positive, got {num_devices}')
  if len(mesh_shape) != 2:
    raise ValueError(f'mesh_shape must be (data, model), got {tuple(mesh_shape)}')
  data, model = (int(x) for x in mesh_shape)
  if model < 1:
    raise ValueError(f'mesh_shape {tuple(mesh_shape)}: the model axis must be positive '
                     '(only the data axis may be -1)')
  if data == -1:
    if num_devices % model:
      raise ValueError(f'mesh_shape {tuple(mesh_shape)}: model axis {model} does not divide '
                       f'{num_devices} devices')
    data = num_devices // model
  if data < 1:
    raise ValueError(f'mesh_shape {tuple(mesh_shape)}: the data axis must be positive or -1')
  if data * model != num_devices:
    raise ValueError(f'mesh_shape {tuple(mesh_shape)} does not cover the {num_devices} devices '
                     f'({data} x {model} = {data * model})')
  return data, model


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _tree_bytes(tree) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def _unique_capacity(rows: int, slots: int, batch_size: int) -> int:
  """models.UniqueRows' capacity for the batch's distinct rows of one array, at its largest."""
  return models.unique_capacity(min(batch_size * slots, rows) + 1)  # + 1: the padding entry


def _local_setup(config) -> train.Setup:
  """train.make_setup on the local devices: the model and optimizers exactly as a run builds them.

  Only the mesh differs from the run's; the planner never uses it, so any device count is planned
  on any machine.
  """
  config = copy.deepcopy(config)
  config.mesh_shape = (-1, 1)
  return train.make_setup(config)


def _activation_bytes_per_row(setup: train.Setup, bf16: bool) -> int:
  """Forward values of one example, x 2 for training (saved values and their gradients)."""
  spec = setup.spec
  model = setup.model
  # Looked-up slot rows [S, D] and pooled features [F, D], float32 as the tables.
  float32 = (spec.num_slots + spec.num_sparse) * spec.embedding_dim
  if model.interaction_op == 'dot':
    n = spec.num_sparse + 1
    float32 += n * spec.embedding_dim + n * n  # stacked features and their Gram: float32 always
  width = models.interaction_width(spec, model.bottom_mlp[-1], model.interaction_op)
  if model.interaction_op == 'dcn':
    # The float32 cross stream: its input, then each layer's low-rank product, W's and x_{l+1}.
    float32 += width + model.dcn_num_layers * (model.dcn_low_rank_dim + 2 * width)
  per_layer = 3 if model.batch_norm else 2  # Dense output, ReLU output (, batch norm output)
  values = spec.num_dense + per_layer * sum(model.bottom_mlp)
  values += width
  values += 2 * sum(model.top_mlp) + 1      # Dense and ReLU outputs, then the logit
  return 2 * (float32 * 4 + values * (2 if bf16 else 4))


# ------------------------------------------------------------------------------------------------
# The plan.

def plan(config, num_devices: int, mesh_shape: Optional[Sequence[int]] = None) -> Plan:
  """Bytes per device of training `config` on `num_devices` devices.

  Args:
    config: a training config (configs/*.py).
    num_devices: devices in the mesh; they need not exist here.
    mesh_shape: (data, model), data may be -1; default config.mesh_shape.

  Returns:
    The Plan.

  Raises:
    ValueError: what the trainer would refuse: a bad config value, a mesh that does not cover
      the devices, a model axis that does not divide ROW_PADDING, or a train or eval batch that
      does not split over the data axis.
  """
  train.check_config(config)
  data, model = resolve_mesh(config.mesh_shape if mesh_shape is None else mesh_shape,
                             num_devices)
  options = train.effective_options(config)
  setup = _local_setup(config)
  spec = setup.spec
  batch_size = int(config.batch_size)
  train.check_batch_split(config, data, (data, model))
  if ROW_PADDING % model:
    # As train.make_mesh: the padded rows of every table array split over the model axis.
    raise ValueError(f'the model axis ({model}) must divide {ROW_PADDING}, the multiple table '
                     'rows are padded to')

  stored = models.table_array_rows(spec, setup.emb_fusion)  # padding included
  dim = spec.embedding_dim
  table_shapes = {name: jax.ShapeDtypeStruct((rows, dim), jnp.float32)
                  for name, rows in stored.items()}
  tables = sum(_nbytes(t) for t in table_shapes.values()) // model

  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  variables = jax.eval_shape(
      functools.partial(setup.model.init, train=False), key,
      jax.ShapeDtypeStruct((2, spec.num_dense), jnp.float32),
      jax.ShapeDtypeStruct((2, spec.num_sparse, dim), jnp.float32))
  mlp = variables['params']
  mlp_params = _tree_bytes(mlp) + _tree_bytes(variables.get('batch_stats', {}))

  groups = models.table_groups(spec, setup.emb_fusion)
  capacity = {name: _unique_capacity(stored[name], len(groups[name][0]), batch_size)
              for name in stored}
  unique_rows = sum(capacity.values()) * dim * 4  # one [capacity, D] float32 buffer per array

  if setup.row_tx is None:
    # Dense path: one optax state over MLPs and tables; the tables' slots are split like them.
    joint = jax.eval_shape(setup.tx.init, {'mlp': mlp, 'tables': table_shapes})
    leaves = jax.tree_util.tree_flatten_with_path(joint)[0]
    table_optimizer_state = sum(_nbytes(x) for p, x in leaves
                                if optimizers.under_tables(p)) // model
    mlp_optimizer_state = sum(_nbytes(x) for p, x in leaves if not optimizers.under_tables(p))
    # The unique rows gathered, their gradient, and that scattered into a full-table gradient.
    table_step_temporaries = 2 * unique_rows + tables
  else:
    mlp_optimizer_state = _tree_bytes(jax.eval_shape(setup.tx.init, mlp))
    table_optimizer_state = 0
    slot_row_bytes = 0  # bytes of one row across the row-wise slots, times the capacity
    integer_slots = 0  # adagraddecay's int32 decay period, per device
    for name, shape in table_shapes.items():
      state = jax.eval_shape(setup.row_tx.init, shape)
      for x in jax.tree.leaves(state):
        if x.ndim and x.shape[0] == shape.shape[0]:
          table_optimizer_state += _nbytes(x) // model
          slot_row_bytes += capacity[name] * _nbytes(x) // x.shape[0]
          if jnp.issubdtype(x.dtype, jnp.integer):
            integer_slots += _nbytes(x) // model
        else:
          table_optimizer_state += _nbytes(x)  # step counts, replicated
    # The unique rows gathered and their gradient, then ...
    table_step_temporaries = 2 * unique_rows
    if config.optimizer.lower() in DENSE_ROWWISE_OPTIMIZERS:
      table_step_temporaries += tables     # ... a full-table gradient (TF's dense Adam), or
    else:
      table_step_temporaries += slot_row_bytes  # ... each slot's rows, gathered and updated.
    if data > 1:
      # With a data axis XLA's partitioned scatter copies the int32 decay period whole before
      # updating it (seen on XLA:CPU: 76 MB a device for DeepRec's Criteo tables on (8, 1)).
      table_step_temporaries += integer_slots

  rows_per_device = batch_size // data
  activations = rows_per_device * _activation_bytes_per_row(setup, options['bf16'])
  # label, mask and dense [n] per row, entry_index, entry_weight and entry_segment per live slot
  # (at most num_slots a row), all 4 bytes, split over data; the unique ids of each table array
  # replicated.
  per_row = 4 * (2 + spec.num_dense + 3 * spec.num_slots)
  one_batch = rows_per_device * per_row + 4 * sum(capacity.values())
  # Under smartstaged the prefetch queue holds STAGED_BATCHES, and one more may be on its way to
  # the devices while the queue is full.
  batches_on_device = 1 + (train.STAGED_BATCHES + 1 if options['smartstaged'] else 0)

  return Plan(
      num_devices=num_devices, mesh_shape=(data, model), optimizer=config.optimizer.lower(),
      sparse_updates=setup.row_tx is not None, table_rows=spec.total_rows,
      stored_table_rows=sum(stored.values()), embedding_dim=dim, batch_size=batch_size,
      rows_per_device=rows_per_device, batches_on_device=batches_on_device,
      tables=tables, table_optimizer_state=table_optimizer_state,
      table_step_temporaries=table_step_temporaries, mlp_params=mlp_params,
      mlp_optimizer_state=mlp_optimizer_state, activations=activations,
      batch=batches_on_device * one_batch)


def largest_data_axis_that_fits(config, num_devices: int,
                                device_memory_bytes: float) -> Optional[Plan]:
  """The fitting plan with the smallest model axis, or None.

  Here the model axis only splits the tables; MLP work and activations split over 'data' alone,
  so the best mesh is the one with the fewest table shards that still fit.
  """
  for model in range(1, num_devices + 1):
    if num_devices % model:
      continue
    try:
      candidate = plan(config, num_devices, (num_devices // model, model))
    except ValueError:
      continue
    if candidate.fits(device_memory_bytes):
      return candidate
  return None


# ------------------------------------------------------------------------------------------------
# Printing.

def format_bytes(n: float) -> str:
  for unit, size in (('TB', 10**12), ('GB', GB), ('MB', 10**6), ('KB', 10**3)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{int(n)} B'


def describe(p: Plan, device_memory_bytes: Optional[float] = None) -> str:
  """The plan as a table, then the verdict for `device_memory_bytes` if given."""
  data, model = p.mesh_shape
  path = 'sparse updates' if p.sparse_updates else 'dense updates'
  lines = [
      f'{p.num_devices} devices, mesh (data={data}, model={model}); {p.optimizer}, {path}',
      f'{p.table_rows:,} embedding rows x {p.embedding_dim} ({p.stored_table_rows:,} stored); '
      f'batch {p.batch_size:,} ({p.rows_per_device:,} rows per device)',
      '',
  ]
  header = ('component', 'layout', 'per device', 'total')
  rows = [(c.name, c.layout, format_bytes(c.per_device), format_bytes(c.total))
          for c in p.components()]
  rows.append(('total', '', format_bytes(p.per_device), format_bytes(p.per_device * p.num_devices)))
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]

  def line(r):
    return (f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  '
            f'{r[3]:>{widths[3]}}')
  lines += [line(header), '-' * len(line(header))]
  lines += [line(r) for r in rows[:-1]]
  lines += ['-' * len(line(header)), line(rows[-1])]
  if device_memory_bytes is not None:
    need, have = format_bytes(p.per_device), format_bytes(device_memory_bytes)
    headroom = p.headroom(device_memory_bytes)
    if p.fits(device_memory_bytes):
      lines += ['', f'FITS: {need} of {have} per device, {format_bytes(headroom)} headroom '
                    f'({headroom / device_memory_bytes:.0%})']
    else:
      lines += ['', f'DOES NOT FIT: {need} needed per device, {have} available '
                    f'({format_bytes(-headroom)} short)']
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  mesh = None
  if FLAGS.mesh:
    try:
      mesh = tuple(int(x) for x in FLAGS.mesh.split(','))
    except ValueError:
      sys.exit(f'--mesh={FLAGS.mesh!r}: expected DATA,MODEL, e.g. 1,8')
  if not 0 < FLAGS.device_memory_gb < math.inf:
    sys.exit(f'--device_memory_gb={FLAGS.device_memory_gb}: expected a positive number of GB')
  memory = FLAGS.device_memory_gb * GB
  config = cli.command_line_config(FLAGS.config)
  try:
    p = plan(config, FLAGS.devices, mesh)
  except ValueError as e:
    # The message names config fields; say which flags and settings they came from.
    source = (f'--mesh={FLAGS.mesh}' if FLAGS.mesh else
              f"the config's mesh_shape {tuple(config.mesh_shape)}: --mesh=DATA,MODEL "
              'plans another')
    sys.exit(f'error: {e} (--devices={FLAGS.devices}, {source})')
  train.log_overridden_settings(config)
  print(describe(p, memory))
  best = largest_data_axis_that_fits(config, FLAGS.devices, memory)
  if best is None:
    print(f'No mesh of {FLAGS.devices} device(s) fits in {format_bytes(memory)} per device.')
  else:
    print(f'Largest data axis that fits: --mesh={best.data},{best.model} '
          f'({format_bytes(best.per_device)} per device)')
  if not p.fits(memory):
    sys.exit(1)

if __name__ == '__main__':
  # Flags are defined here, not on import, so that tests may import this module beside
  # dlrm_jax.main (which defines --config too).
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_integer('devices', None, 'Devices in the mesh (they need not exist here).')
  flags.DEFINE_string('mesh', None, 'DATA,MODEL mesh shape; DATA may be -1 (default: the '
                      "config's mesh_shape).")
  flags.DEFINE_float('device_memory_gb', 80.0, 'Memory of one device, GB (10^9 bytes).')
  flags.mark_flags_as_required(['config', 'devices'])
  # Planning needs no accelerator: keep JAX off it, so the planner never takes device memory.
  jax.config.update('jax_platforms', 'cpu')
  app.run(main, flags_parser=cli.parse_flags)
