r"""Ablations: one base config trained over a grid of field values and several seeds.

  python -m experiments.ablate --config=configs/ablation_interactions.py \
      --grid interaction_op=dot,cat --seeds 1,2,3 --out_dir runs/ablation_interactions

Every (variant, seed) pair is a cell, trained by `train.train_and_evaluate` in
`out_dir/<cell name>` (e.g. `interaction_op-dot_seed-2`). The seed is the config's `seed`
(initialisation and shuffle order); the planted data is generated once under
`out_dir/data/planted-<hash of config.planted>/` and shared by every cell, so the cells differ
only in what the grid and the seed change. Compiled programs go to JAX's persistent compilation
cache in `out_dir/jax_cache` (unless one is configured already): a seed only changes data, so
every seed after a variant's first skips compiling.

A cell is finished when its `results.json` exists (train.py writes it atomically, last) and
says neither that a preemption notice stopped it nor that its evaluation or export failed after
training (`failed_after_training`: the rerun restores the last step and evaluates), so an
interrupted grid resumes: finished cells are read back, an interrupted cell resumes from its
newest checkpoint, and the rest train. Each
cell keeps the config it was trained with in `cell_config.json`; resuming into an `out_dir` made
from a different config is an error rather than a table that mixes two experiments.

Writes, in `out_dir`:
  results.csv, results.md  mean and spread (sample std over seeds) of eval AUC, logloss, accuracy,
                           train samples/s and steps per variant, with the oracle AUC and logloss
  cells.csv                one row per cell
  auc.png                  eval AUC per variant: each seed, the mean +- std, the oracle AUC
  loss.png                 training loss curves (TensorBoard `train_loss`), one colour a variant

Several --grid flags make the cross product, e.g. `--grid interaction_op=dot,cat
--grid learning_rate=0.01,0.001`. Values take the type of the field they replace; tuple fields
(MLP widths) write their elements with '-': `--grid top_mlp=512-256,256`.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import pandas as pd

from dlrm_jax import cli
from dlrm_jax import metric_writer
from dlrm_jax import metrics

# The metrics the table summarises, in column order, with their Markdown headers and formats.
METRICS = (
    ('eval_auc', 'eval AUC', '{:.4f}'),
    ('eval_logloss', 'eval logloss', '{:.4f}'),
    ('eval_accuracy', 'eval accuracy', '{:.4f}'),
    ('train_samples_per_s', 'samples/s', '{:,.0f}'),
    ('steps', 'steps', '{:,.0f}'),
)
# Properties of the data, not of the model: the same in every cell that shares the data.
ORACLE = (('oracle_auc', 'oracle AUC', '{:.4f}'), ('oracle_logloss', 'oracle logloss', '{:.4f}'))

DEFAULT_GRID = ('interaction_op=dot,cat',)
RESULTS = 'results.json'
CELL_CONFIG = 'cell_config.json'

TrainFn = Callable[[ml_collections.ConfigDict, str], Dict[str, Any]]


# ------------------------------------------------------------------------------------------------
# The grid.

def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
  """`config.a.b` for path 'a.b'; a KeyError names the field if it does not exist."""
  node = config
  for key in path.split('.'):
    if key not in node:
      raise KeyError(f'the config has no field {path!r}')
    node = node[key]
  return node


def set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, last = path.split('.')
  node = config
  for key in parents:
    node = node[key]
  node[last] = value


def parse_value(text: str, current: Any) -> Any:
  """`text` as a value of the type of `current`, the field's value in the base config."""
  if isinstance(current, bool):  # before int: bool is an int
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{text!r} is not a boolean')
    return text.lower() in ('true', '1')
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    element = type(current[0]) if current else int
    return tuple(element(x) for x in text.split('-') if x)
  return text


def parse_grid(specs: Sequence[str],
               config: ml_collections.ConfigDict) -> Dict[str, Tuple[Any, ...]]:
  """['interaction_op=dot,cat', ...] -> {'interaction_op': ('dot', 'cat'), ...}, typed."""
  grid = {}
  for spec in specs:
    field, sep, values = spec.partition('=')
    field = field.strip()
    if not sep or not values.strip():
      raise ValueError(f'--grid {spec!r}: expected FIELD=VALUE[,VALUE...]')
    if field == 'seed':
      raise ValueError('the seed is not a grid field: pass --seeds')
    if field in grid:
      raise ValueError(f'--grid names {field!r} twice')
    current = get_field(config, field)
    if current is None:  # an unset placeholder (optimizer_hparams.*): its declared type's zero
      *parents, last = field.split('.')
      node = get_field(config, '.'.join(parents)) if parents else config
      current = node.get_ref(last).get_type()()
    try:
      grid[field] = tuple(parse_value(v.strip(), current) for v in values.split(','))
    except ValueError as e:
      raise ValueError(f'--grid {spec!r}: {e}') from None
  return grid


def _value_name(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '-'.join(str(v) for v in value)
  return str(value)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid: a variant (field values) and a seed."""
  variant: Tuple[Tuple[str, Any], ...]
  seed: int

  @property
  def variant_name(self) -> str:
    """Human-readable, e.g. 'interaction_op=dot'."""
    return ', '.join(f'{f}={_value_name(v)}' for f, v in self.variant)

  @property
  def name(self) -> str:
    """The cell's directory name, e.g. 'interaction_op-dot_seed-2'."""
    parts = [f'{f}-{_value_name(v)}' for f, v in self.variant] + [f'seed-{self.seed}']
    return re.sub(r'[^A-Za-z0-9._-]', '_', '_'.join(parts))


def make_cells(grid: Mapping[str, Sequence[Any]], seeds: Sequence[int]) -> List[Cell]:
  """The cross product, variants in grid order and seeds innermost."""
  if not seeds:
    raise ValueError('no seeds')
  fields = list(grid)
  return [Cell(tuple(zip(fields, values)), int(seed))
          for values in itertools.product(*(grid[f] for f in fields)) for seed in seeds]


def data_dir(config: ml_collections.ConfigDict, out_dir: str) -> str:
  """Where the cells' planted data goes: one directory per distinct planted setting.

  Keyed by the planted fields so that a grid over them (e.g. planted.interaction_weight) gives
  each setting its own files instead of regenerating one directory back and forth.
  """
  # Unset fields (None: the generator's defaults) left out: the keys of earlier releases' data.
  set_fields = {k: v for k, v in config.planted.to_dict().items() if v is not None}
  planted = json.dumps(set_fields, sort_keys=True, default=str)
  return os.path.join(out_dir, 'data', 'planted-' + hashlib.sha1(planted.encode()).hexdigest()[:8])


def cell_config(base: ml_collections.ConfigDict, cell: Cell,
                out_dir: str) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  for field, value in cell.variant:
    set_field(config, field, value)
  config.seed = cell.seed
  config.output_dir = data_dir(config, out_dir)
  return config


# ------------------------------------------------------------------------------------------------
# Running cells.

def config_dict(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  # Through JSON so tuples and lists compare equal to what was read back from the file.
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
  # output_dir follows from out_dir and the planted fields (compared themselves): leaving it out
  # lets a moved or copied out_dir resume. A cell trains in its own directory whatever
  # `checkpoint` says, so adding one does not make another experiment.
  # Unset planted fields (None: the generator's defaults) are left out as earlier releases did.
  comparable = {k: v for k, v in config.items() if k not in ('output_dir', 'checkpoint')}
  if isinstance(comparable.get('planted'), dict):
    comparable['planted'] = {k: v for k, v in comparable['planted'].items() if v is not None}
  return comparable


def _read_json(path: str) -> Dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def changed_fields(found: Dict[str, Any], wanted: Dict[str, Any], where: str) -> List[str]:
  """The fields whose values differ between two config_dicts, where a run writes (output_dir,
  checkpoint) aside. A field that only one side has comes from a newer or older version of the
  code, where it did not exist yet: its default keeps the old behaviour, so it does not make
  another experiment, and is only logged (`where` names the directory)."""
  found, wanted = _comparable(found), _comparable(wanted)
  unmatched = sorted(set(found) ^ set(wanted))
  if unmatched:
    logging.warning('%s: config fields %s are on one side only; going on', where,
                    ', '.join(unmatched))
  return sorted(k for k in set(found) & set(wanted) if found[k] != wanted[k])


def _check_same_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the cell's config, or fails if the directory holds a run of another config."""
  path = os.path.join(workdir, CELL_CONFIG)
  wanted = config_dict(config)
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    metrics.write_json_atomic(path, wanted)
    return
  changed = changed_fields(_read_json(path), wanted, workdir)
  if changed:
    raise ValueError(f'{workdir} was trained with another config (fields differ: '
                     f'{", ".join(changed)}); use a new --out_dir or delete that cell')


def run_cell(config: ml_collections.ConfigDict, workdir: str,
             train_fn: Optional[TrainFn] = None) -> Tuple[Dict[str, Any], bool]:
  """The cell's results and whether they were computed now (False: read back, finished before)."""
  _check_same_config(workdir, config)
  results_path = os.path.join(workdir, RESULTS)
  earlier = None
  if os.path.exists(results_path):
    results = earlier = _read_json(results_path)
    if 'preempted_at_step' in results:
      logging.info('%s: stopped by a preemption notice at step %d; resuming it', workdir,
                   results['preempted_at_step'])
    elif 'failed_after_training' in results:
      logging.info('%s: trained, then failed (%s); evaluating it again', workdir,
                   results['failed_after_training'])
    else:
      return results, False
  if train_fn is None:
    from dlrm_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  from dlrm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    results = dict(train_fn(config, workdir))
  except checkpoints.Preempted:
    # The trainer's message names --config.checkpoint, which is not how a grid resumes.
    stopped = _read_json(results_path).get('preempted_at_step')
    raise checkpoints.Preempted(
        f'{workdir}: stopped after step {stopped} and checkpointed; the same '
        'experiments.ablate command resumes this cell from there (finished cells are read '
        'back)') from None
  except Exception:
    logging.error('%s: failed (below); once that is fixed, the same experiments.ablate command '
                  'resumes or re-evaluates this cell', workdir)
    raise
  rate = results.get('train_samples_per_s')
  if earlier is not None and (rate is None or not np.isfinite(rate)):
    # A cell that failed after training is evaluated again without a step: its rate is the one
    # it trained at (otherwise the variant's mean would silently lose this seed).
    results['train_samples_per_s'] = earlier.get('train_samples_per_s')
  return results, True


def run_grid(base: ml_collections.ConfigDict, grid: Mapping[str, Sequence[Any]],
             seeds: Sequence[int], out_dir: str,
             train_fn: Optional[TrainFn] = None) -> pd.DataFrame:
  """Trains every unfinished cell; one row per cell: grid fields, seed, cell, then results."""
  cells = make_cells(grid, seeds)
  configs = [cell_config(base, cell, out_dir) for cell in cells]
  # Every cell's values are checked before the first cell trains: a bad value late in the grid
  # would otherwise stop it hours in.
  from dlrm_jax import train  # pylint: disable=g-import-not-at-top
  for cell, config in zip(cells, configs):
    try:
      train.check_config(config)
    except ValueError as e:
      raise ValueError(f'grid cell {cell.name}: {e}') from None
  rows = []
  for i, (cell, config) in enumerate(zip(cells, configs)):
    workdir = os.path.join(out_dir, cell.name)
    logging.info('cell %d/%d: %s, seed %d', i + 1, len(cells), cell.variant_name, cell.seed)
    results, trained = run_cell(config, workdir, train_fn)
    if not trained:
      logging.info('  finished before; read %s', os.path.join(workdir, RESULTS))
    rows.append({**dict(cell.variant), 'variant': cell.variant_name, 'seed': cell.seed,
                 'cell': cell.name, 'trained_now': trained, **results})
  return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# The table.

def summarize(cells: pd.DataFrame, fields: Sequence[str]) -> pd.DataFrame:
  """Per variant (in grid order): seed count, mean and sample std of each metric, the oracle."""
  rows = []
  for variant, group in cells.groupby('variant', sort=False):
    row = {f: _value_name(group[f].iloc[0]) for f in fields}
    row.update(variant=variant, seeds=len(group))
    for key, _, _ in METRICS:
      values = group[key].astype(float) if key in group else pd.Series([np.nan])
      row[f'{key}_mean'] = values.mean()
      # Sample std (ddof=1): the spread one more seed would show; NaN from a single seed.
      row[f'{key}_std'] = values.std(ddof=1) if len(values) > 1 else np.nan
    for key, _, _ in ORACLE:
      row[key] = group[key].astype(float).mean() if key in group else np.nan
    rows.append(row)
  return pd.DataFrame(rows)


def _mean_std(mean: float, std: float, fmt: str) -> str:
  if np.isnan(mean):
    return '–'
  text = fmt.format(mean)
  return text if np.isnan(std) else f'{text} ± {fmt.format(std)}'


def markdown_table(summary: pd.DataFrame, fields: Sequence[str]) -> str:
  """A GitHub Markdown table: one row per variant, 'mean ± std' over seeds."""
  header = list(fields) + ['seeds'] + [h for _, h, _ in METRICS] + [h for _, h, _ in ORACLE]
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * len(fields) + ['---:'] * (len(header) - len(fields))) + '|']
  for _, row in summary.iterrows():
    cells = [str(row[f]) for f in fields] + [str(row['seeds'])]
    cells += [_mean_std(row[f'{k}_mean'], row[f'{k}_std'], fmt) for k, _, fmt in METRICS]
    cells += [_mean_std(row[k], np.nan, fmt) for k, _, fmt in ORACLE]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def describe(base: ml_collections.ConfigDict, seeds: Sequence[int]) -> str:
  """One line saying which data and model the table is about."""
  planted = ', '.join(f'{k}={v}' for k, v in sorted(base.planted.to_dict().items())
                      if v is not None)
  data = f'planted data ({planted})' if not base.data_location else base.data_location
  return (f'{data}; seeds {", ".join(map(str, seeds))}; batch {base.batch_size}, '
          f'hash_buckets {base.hash_buckets}, embedding_dim {base.embedding_dim}, '
          f'bottom_mlp {_value_name(base.bottom_mlp)}, top_mlp {_value_name(base.top_mlp)}, '
          f'optimizer {base.optimizer}, learning_rate {base.learning_rate}.')


# Loss curves are read back from the run's TensorBoard event files.
read_scalars = metric_writer.read_scalars


# ------------------------------------------------------------------------------------------------
# Plots. matplotlib's object API, not pyplot: no global backend is chosen, so importing this
# module neither needs a display nor changes how a notebook shows its own figures.

def _colors(n: int) -> List[str]:
  return [f'C{i % 10}' for i in range(n)]


def _draw_auc(ax, cells: pd.DataFrame, summary: pd.DataFrame, title: str) -> None:
  """Every seed as a dot, the mean with a ±std bar beside them, the oracle AUC dashed."""
  for x, ((_, row), color) in enumerate(zip(summary.iterrows(), _colors(len(summary)))):
    aucs = cells.loc[cells['variant'] == row['variant'], 'eval_auc'].astype(float).to_numpy()
    # A small fixed spread keeps seeds with equal AUCs visible side by side.
    offsets = np.linspace(-0.12, 0.12, len(aucs)) if len(aucs) > 1 else np.zeros(1)
    ax.scatter(x + offsets, aucs, color=color, alpha=0.6, s=22, zorder=3)
    std = 0.0 if np.isnan(row['eval_auc_std']) else row['eval_auc_std']
    ax.errorbar(x + 0.3, row['eval_auc_mean'], yerr=std, fmt='o', color=color, capsize=4,
                markersize=7, zorder=4)
  oracle = summary['oracle_auc'].dropna()
  if len(oracle):
    ax.axhline(oracle.iloc[0], color='0.3', linestyle='--', linewidth=1)
    ax.annotate(f'oracle {oracle.iloc[0]:.4f}', (0.01, oracle.iloc[0]),
                xycoords=('axes fraction', 'data'), textcoords='offset points', xytext=(0, 3),
                fontsize=8, color='0.3')
  ax.set_xticks(range(len(summary)), summary['variant'], fontsize=9)
  ax.set_xlim(-0.6, len(summary) - 0.3)
  ax.set_ylabel('eval AUC')
  ax.grid(axis='y', alpha=0.3)
  ax.set_title(title, fontsize=10)


def plot_auc(cells: pd.DataFrame, summary: pd.DataFrame, path: str, title: str = '') -> str:
  """Eval AUC per variant with its seed spread and the oracle AUC, as a PNG at `path`."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(1.6 + 1.4 * len(summary), 3.6), layout='constrained')
  _draw_auc(fig.subplots(), cells, summary,
            title or 'eval AUC per variant (dots: seeds; bar: mean ± std)')
  fig.savefig(path, dpi=120)
  return path


def plot_auc_panels(ablations: Mapping[str, 'Ablation'], path: str) -> str:
  """One AUC panel per ablation (e.g. per planted setting), side by side, as a PNG at `path`."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  width = sum(1.6 + 1.4 * len(a.summary) for a in ablations.values())
  fig = Figure(figsize=(width, 3.6), layout='constrained')
  axes = np.atleast_1d(fig.subplots(1, len(ablations)))
  for ax, (name, ablation) in zip(axes, ablations.items()):
    _draw_auc(ax, ablation.cells, ablation.summary, name)
  fig.suptitle('eval AUC (dots: seeds; bar: mean ± std; dashed: oracle)', fontsize=10)
  fig.savefig(path, dpi=120)
  return path


def plot_losses(cells: pd.DataFrame, out_dir: str, path: str, title: str = '') -> str:
  """Training loss against step: one colour per variant, one line per seed."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.0, 3.6), layout='constrained')
  ax = fig.subplots()
  variants = list(dict.fromkeys(cells['variant']))
  for variant, color in zip(variants, _colors(len(variants))):
    label = variant
    for cell in cells.loc[cells['variant'] == variant, 'cell']:
      steps, losses = read_scalars(os.path.join(out_dir, cell), 'train_loss')
      if len(steps):
        ax.plot(steps, losses, color=color, alpha=0.7, linewidth=1.2, label=label)
        label = None  # one legend entry per variant
  ax.set_xlabel('step')
  ax.set_ylabel('train loss (mean over the logging window)')
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=9)
  ax.set_title(title or 'training loss', fontsize=10)
  fig.savefig(path, dpi=120)
  return path


# ------------------------------------------------------------------------------------------------
# Everything together.

@dataclasses.dataclass
class Ablation:
  cells: pd.DataFrame     # one row per cell
  summary: pd.DataFrame   # one row per variant
  markdown: str           # the table, as written to results.md (without its preamble)
  files: Dict[str, str]   # 'csv', 'md', 'cells_csv', and 'auc_png', 'loss_png' with plots


def use_compilation_cache(directory: str) -> str:
  """Turns on JAX's persistent compilation cache in `directory`, unless one is already set.

  The cells of one variant differ only in the seed, which is data to the compiled programs, so
  every seed after the first reuses the first one's executables instead of recompiling (on a
  CPU, compiling takes longer than a short run). Process-wide, and left on afterwards.
  """
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  compilation_cache.set_cache_dir(directory)
  # JAX decides once per process whether the cache is in use; reset so the new directory counts
  # even when something has already been compiled.
  compilation_cache.reset_cache()
  return directory


@contextlib.contextmanager
def compilation_cache_in(directory: str) -> Iterator[None]:
  """use_compilation_cache for the grid's runs only: a caller's later compiles (another grid's,
  in a notebook) went on being written into this grid's directory."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache
  if jax.config.jax_compilation_cache_dir:  # the caller's own: left as it is
    yield
    return
  use_compilation_cache(directory)
  try:
    yield
  finally:
    jax.config.update('jax_compilation_cache_dir', None)
    compilation_cache.reset_cache()


def run_ablation(base: ml_collections.ConfigDict, grid: Mapping[str, Sequence[Any]],
                 seeds: Sequence[int], out_dir: str, plots: bool = True, title: str = '',
                 train_fn: Optional[TrainFn] = None,
                 compilation_cache: bool = True) -> Ablation:
  """Runs (or resumes) the grid and writes the tables and plots into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  with contextlib.ExitStack() as cache:
    if compilation_cache:
      cache.enter_context(compilation_cache_in(os.path.join(out_dir, 'jax_cache')))
    cells = run_grid(base, grid, seeds, out_dir, train_fn)
  fields = list(grid)
  summary = summarize(cells, fields)
  table = markdown_table(summary, fields)
  files = {'csv': os.path.join(out_dir, 'results.csv'),
           'md': os.path.join(out_dir, 'results.md'),
           'cells_csv': os.path.join(out_dir, 'cells.csv')}
  summary.to_csv(files['csv'], index=False)
  cells.drop(columns=['trained_now']).to_csv(files['cells_csv'], index=False)
  with open(files['md'], 'w') as f:
    f.write(f'{describe(base, seeds)}\n\n{table}\n')
  if plots:
    files['auc_png'] = plot_auc(cells, summary, os.path.join(out_dir, 'auc.png'), title)
    files['loss_png'] = plot_losses(cells, out_dir, os.path.join(out_dir, 'loss.png'), title)
  return Ablation(cells, summary, table, files)


# ------------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined on demand, not at import: a notebook or a test importing this module must not
  claim flag names (such as --config) that dlrm_jax.main also defines."""
  config_flags.DEFINE_config_file('config', None, 'Base training configuration file.',
                                  lock_config=True)
  flags.DEFINE_multi_string('grid', list(DEFAULT_GRID),
                            'FIELD=VALUE[,VALUE...]; several flags make the cross product.')
  flags.DEFINE_list('seeds', ['1', '2', '3'], 'Values of config.seed, one cell each per variant.')
  flags.DEFINE_string('out_dir', None, 'Directory of the cells, tables and plots.')
  flags.DEFINE_bool('plots', True, 'Write auc.png and loss.png (needs matplotlib).')
  flags.mark_flags_as_required(['config', 'out_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from dlrm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.quiet_orbax_info()
  config = cli.command_line_config(FLAGS.config)
  out_dir = os.path.expanduser(FLAGS.out_dir)  # '--out_dir=~/x': the shell leaves this '~'
  try:
    grid = parse_grid(FLAGS.grid, config)
  except (KeyError, ValueError) as e:  # a typo on the command line: no traceback
    cli.fail(str(e).strip('"'))
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    cli.fail(f'--seeds={",".join(FLAGS.seeds)}: expected integers, e.g. --seeds=1,2,3')
  title = os.path.basename(os.path.normpath(out_dir))
  ablation = run_ablation(config, grid, seeds, out_dir, FLAGS.plots, title)
  trained = int(ablation.cells['trained_now'].sum())
  print(f'{len(ablation.cells)} cells ({trained} trained now, '
        f'{len(ablation.cells) - trained} finished before) in {out_dir}\n')
  print(ablation.markdown)
  print('\n' + '\n'.join(f'{k}: {v}' for k, v in ablation.files.items()))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
