"""A serving artifact: the scoring function as serialized StableHLO plus its parameters.

`export_model` (run in the training process) writes a directory with
  model.jax_export   jax.export serialization of score(params, dense, ids, weights) -> probs,
                     with a symbolic batch dimension;
  params.npz         every array the function takes, flattened by path;
  spec.json          the feature spec's name and sizes, the config fields it is built from, the
                     encoding of the rows it trained on (`input_encoding`, `load_input_encoding`)
                     and where the parameters come from (the training step and run directory).
`load` (any process, no model or training code imported) returns a callable that scores batches
in the layout of `feature_spec` (dense, ids, weights); `load_spec` gives the spec to parse rows
into that layout with `input_pipeline`:

  score, spec = serving.load(d), serving.load_spec(d)
  batch = input_pipeline.parse_chunk(lines, spec.unlabeled(), path='request', first_line=1)
  probs = score(batch['dense'], batch['ids'], batch['weights'])

A model trained on TorchRec's .npy triples (`load_input_encoding(d) == 'torchrec_npy'`) reads
its rows in that encoding instead: `input_pipeline.iter_row_chunks('<name>_dense.npy',
spec.unlabeled())` gives the same layout (parse_chunk's hashes of text fields would be other
ids).

Serving looks rows up by id directly; the host-side dedup of training is a training-time device
optimisation only.
"""

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import uuid
from typing import Callable, Dict, Optional

import jax
import jax.export  # a submodule: `import jax` alone did not load it before jax 0.8
import jax.numpy as jnp
import numpy as np

ARTIFACT = 'model.jax_export'
PARAMS = 'params.npz'
SPEC = 'spec.json'
EXPORT_FILES = (ARTIFACT, PARAMS, SPEC)  # all an export directory holds
PLATFORMS = ('cpu', 'cuda', 'tpu')  # what jax.export lowers the artifact for
# How a model's rows were encoded: as text (parse_chunk: hashed strings, log(x + 1)), or as
# TorchRec's .npy triples (torchrec_npy: ids modulo the tables, TorchRec's dense transform).
INPUT_ENCODINGS = ('text', 'torchrec_npy')


def _flatten(tree) -> Dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def check_export_dir(directory: str, workdir: Optional[str] = None) -> None:
  """Refuses a `directory` that holds anything but an earlier export's files, or whose
  replacement would take the run directory `workdir` or its checkpoints with it: exporting
  replaces the whole directory (export_dir=./result would delete every run in it)."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f'export_dir {directory} is a file, not a directory')
  if workdir is not None:
    export, run = os.path.realpath(directory), os.path.realpath(workdir)
    checkpoints = os.path.join(run, 'checkpoints')
    if (run == export or run.startswith(export + os.sep) or export == checkpoints
        or export.startswith(checkpoints + os.sep)):
      raise ValueError(f'export_dir {directory} would replace the run directory {workdir} or '
                       'its checkpoints: name a directory outside them (or <run>/export)')
  others = sorted(set(os.listdir(directory)) - set(EXPORT_FILES)) if os.path.isdir(
      directory) else []
  if others:
    # An earlier export holds these files and nothing else: a directory that also holds runs,
    # data or the user's files is not one, even with an artifact among them.
    raise ValueError(f'export_dir {directory} holds {len(others)} entries besides an export\'s '
                     f'{", ".join(EXPORT_FILES)} (first: {others[0]}): an export replaces the '
                     'whole directory, so name a new one (or an earlier export)')


def export_model(setup, state, directory: str, spec_args: Dict, run_directory: str = '',
                 input_encoding: str = 'text') -> str:
  """Writes the artifact atomically (temporary directory, then rename); returns its path.

  `spec_args`: `feature_spec.spec_args` of the run's config, so that `load_spec` rebuilds the
  spec. `run_directory`: the run the state was trained in, recorded with its step.
  `input_encoding`: how the rows it trained on were encoded (INPUT_ENCODINGS), which requests
  must follow.

  With several processes only process 0 writes: each process holds every parameter whole
  (`train.make_mesh` keeps a table's shards within one process).
  """
  from dlrm_jax import models  # pylint: disable=g-import-not-at-top
  from dlrm_jax import row_cache  # pylint: disable=g-import-not-at-top

  if input_encoding not in INPUT_ENCODINGS:
    raise ValueError(f'input_encoding {input_encoding!r}: expected one of {list(INPUT_ENCODINGS)}')
  check_export_dir(directory)
  spec = setup.spec
  tables = state.params['tables']
  if models.FUSED not in tables:  # one array serves every lookup with one gather
    fused = jnp.concatenate([tables[t.name][:t.rows] for t in spec.tables], axis=0)
    tables = {models.FUSED: fused}
  params = {'tables': tables, 'mlp': state.params['mlp'], 'batch_stats': state.batch_stats}

  def score(params, dense, ids, weights):
    rows = jnp.take(params['tables'][models.FUSED], ids + spec.slot_offsets, axis=0)
    pooled = models.pool_slots(rows, weights, spec)
    logits = setup.model.apply({'params': params['mlp'], 'batch_stats': params['batch_stats']},
                               dense, pooled, train=False)
    return jax.nn.sigmoid(logits)

  batch, = jax.export.symbolic_shape('batch')
  args = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
          jax.ShapeDtypeStruct((batch, spec.num_dense), jnp.float32),
          jax.ShapeDtypeStruct((batch, spec.num_slots), jnp.int32),
          jax.ShapeDtypeStruct((batch, spec.num_slots), jnp.float32))
  # Lowered for every platform a server may run on, not only the one that trained it.
  exported = jax.export.export(jax.jit(score), platforms=PLATFORMS)(*args)
  if jax.process_index() != 0:
    return directory

  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  prefix = _temporary_prefix(directory)
  # Made as any directory is (umask), not 0700 as by mkdtemp: a server running as another user
  # must read the artifact.
  tmp = os.path.join(parent, f'{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}')
  os.mkdir(tmp)
  try:
    with open(os.path.join(tmp, ARTIFACT), 'wb') as f:
      f.write(exported.serialize())
    np.savez(os.path.join(tmp, PARAMS), **_flatten(params))
    with open(os.path.join(tmp, SPEC), 'w') as f:
      json.dump({'name': spec.name, 'num_dense': spec.num_dense, 'num_slots': spec.num_slots,
                 'num_sparse': spec.num_sparse, 'embedding_dim': spec.embedding_dim,
                 'tables': {t.name: t.rows for t in spec.tables}, 'spec_args': spec_args,
                 'input_encoding': input_encoding, 'step': int(state.step),
                 'run_directory': run_directory and os.path.abspath(run_directory)},
                f, indent=2)
    for name in os.listdir(tmp):
      row_cache.fsync_path(os.path.join(tmp, name))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  try:
    exchanged = os.path.lexists(directory) and _exchange(tmp, directory)
  except BaseException:
    _remove(tmp)
    raise
  if exchanged:
    _remove(tmp)  # the previous artifact (or the symlink that named it) is there now
  else:
    # Without an atomic exchange the previous artifact is moved aside, not deleted, until the
    # new one is in place: a crash in between leaves it beside the directory, for the next
    # export to remove.
    previous = f'{tmp}-old'
    try:
      if os.path.lexists(directory):
        os.replace(directory, previous)
      os.replace(tmp, directory)
    except BaseException:
      if os.path.lexists(previous):
        os.replace(previous, directory)
      _remove(tmp)
      raise
    _remove(previous)
  _remove_dead_temporaries(parent, prefix)
  return directory


def _temporary_prefix(directory: str) -> str:
  """The name an export's temporary directories beside `directory` start with; then come the
  writing process's pid and a random part."""
  return f'.{os.path.basename(os.path.abspath(directory))}.export-{socket.gethostname()}-'


def _remove_dead_temporaries(parent: str, prefix: str) -> None:
  """Deletes what killed exports of this directory on this host left beside it (a copy of
  every parameter each)."""
  from dlrm_jax import row_cache  # pylint: disable=g-import-not-at-top
  for entry in os.listdir(parent):
    # The whole rest of the name: a host named like this one with '-<digits>' added is another.
    match = re.fullmatch(r'(\d+)-[0-9a-f]{8}(-old)?', entry[len(prefix):])
    if entry.startswith(prefix) and match and not row_cache.pid_alive(int(match.group(1))):
      _remove(os.path.join(parent, entry))


def _remove(path: str) -> None:
  """Deletes a directory tree, or a symlink (not what it points to); nothing if it is gone."""
  if os.path.islink(path):
    os.unlink(path)
  elif os.path.exists(path):
    shutil.rmtree(path, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one step (Linux renameat2 with RENAME_EXCHANGE): a reader finds the old
  artifact or the new one, never none. False where the system or file system cannot."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  error = ctypes.get_errno()
  # EINVAL: the file system cannot (NFS, CIFS, some FUSE); EPERM: a sandbox filters the call.
  if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
    return False
  raise OSError(error, os.strerror(error), b)


def load_spec(directory: str):
  """The feature spec the artifact's model was trained with (input_pipeline parses rows with it)."""
  from dlrm_jax import feature_spec  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, SPEC)) as f:
    recorded = json.load(f)
  if 'spec_args' not in recorded:
    raise ValueError(f'{directory}/{SPEC} predates spec_args: build the spec with '
                     f'feature_spec.from_args and the run\'s config.json')
  spec = feature_spec.from_args(**recorded['spec_args'])
  if (spec.name, spec.num_slots, spec.num_dense) != (
      recorded['name'], recorded['num_slots'], recorded['num_dense']):
    raise ValueError(f'{directory}/{SPEC}: its spec_args build another spec than it records')
  return spec


def load_input_encoding(directory: str) -> str:
  """'text' or 'torchrec_npy': how requests must encode rows (exports that predate the record
  were all trained on text)."""
  with open(os.path.join(directory, SPEC)) as f:
    return json.load(f).get('input_encoding', 'text')


def load(directory: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
  """score(dense f32[B, n], ids i32[B, S], weights f32[B, S]) -> click probabilities f32[B]."""
  with open(os.path.join(directory, ARTIFACT), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  stored = np.load(os.path.join(directory, PARAMS))
  treedef = exported.in_tree.children()[0].children()[0]
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves))[0]]
  missing = [p for p in paths if p not in stored.files]
  if missing:
    raise ValueError(f'{directory}/{PARAMS} lacks {missing[:3]}')
  params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(stored[p]) for p in paths])

  def score(dense, ids, weights):
    if len(dense) == 0:  # the symbolic batch dimension is at least 1; an empty request is not
      return np.zeros(0, np.float32)
    return np.asarray(exported.call(params, jnp.asarray(dense, jnp.float32),
                                    jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(weights, jnp.float32)))
  return score
