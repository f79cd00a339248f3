r"""Does dlrm-jax train to the same eval AUC as the same DLRM in TorchRec, on the same data?

  python -m experiments.torchrec_parity --config=configs/torchrec_parity.py --seeds 1,2,3 \
      --out_dir runs/torchrec_parity

For every seed, ours trains with `train.train_and_evaluate` (in `out_dir/seed-<n>/ours`), and
the TorchRec twin of the speed benchmark (`experiments/torchrec_dlrm.py`: `build_model`,
`to_torch_batch`) trains on the same batches in the same order (`data_sources.train_batches` with
the same config and seed), for the same number of steps, at the same learning rate, on the mean
BCE loss. Both are then scored on the same eval rows (`data_sources.eval_batches`, masked rows
dropped) by one AUC definition: `dlrm_jax.metrics.classification_metrics` on each side's
probabilities. The planted data set (`out_dir/data`) is generated once and shared by every seed;
a seed changes the initial weights (each side draws its own) and the shuffle order (shared).

Writes, in `out_dir`: parity.json (every seed's figures, the summary and the verdict), parity.md
(the table and the verdict), config.json (the config; a rerun into the same out_dir must use the
same one, and reads back the seeds that finished: `seed-<n>/parity.json`).

The verdict asks whether |mean(ours - TorchRec)| is within 2 standard errors of the per-seed
differences: a screen for a gap larger than seed noise, not a proof of equality.

With `--twin_init=ours` (the default) the twin starts from our initialisers' distributions,
so that only the implementations differ: tables truncated normal with stddev 1/sqrt(dim) cut at
2 stddev (TorchRec: uniform +-sqrt(1/rows)); Linear kernels Glorot uniform with zero biases
(PyTorch: uniform +-1/sqrt(fan_in) for both); the fused table Adagrad's accumulators at
initial_accumulator_value (FBGEMM: 0). `--twin_init=torchrec` keeps TorchRec's and PyTorch's
defaults, the twin as the benchmark builds it. What still differs either way:
  * the values drawn (two RNGs), the order of the pooled features and of the dot interaction's
    pairs (TorchRec: table by table, upper triangle; ours: spec order, lower triangle): the same
    model up to a permutation of the top MLP's inputs, which the initialisers do not see;
  * adagrad's epsilon: none in ours (TF), 1e-10 in torch.optim.Adagrad (MLPs), 1e-8 in FBGEMM
    (tables), against accumulators of at least 0.1 (rowwise_adagrad: 1e-8 on both sides, both
    starting at 0);
  * batch norm's running variance: unbiased in PyTorch, biased in Flax (0.2% at batch 512); it
    only reaches the eval predictions;
  * floating point: XLA against PyTorch/FBGEMM kernels, summation orders; bf16 (config.bf16) is
    our mixed-precision scheme against torch.autocast, which are not the same casts.

The default (configs/torchrec_parity.py, seeds 1,2,3, `--twin_init=ours`) took 1 min 53 s on 2
cores of an AMD EPYC: ~40 s to write and cache the planted rows (once per out_dir), then ~23 s
a seed (ours 196 steps in 5.5 s, the twin in 8.5 s, plus compiling and evaluating 50k rows).
Eval AUC, mean ± std over the seeds: ours 0.7540 ± 0.0039, TorchRec 0.7504 ± 0.0052,
difference +0.0036 ± 0.0073 (within 2 SE), oracle 0.8407. Seeds 1-10: +0.0042 ± 0.0056, just
outside 2 SE (0.0035). `--twin_init=torchrec`, seeds 1-3: TorchRec 0.8018 ± 0.0023, 0.048 above
ours, all of it from FBGEMM's table accumulators starting at 0 (ours at 0.1), and reversed by 3
epochs: the README's "Quality against TorchRec".
"""

import contextlib
import json
import math
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import torch
from torch import nn

from dlrm_jax import cli
from dlrm_jax import data_sources
from dlrm_jax import feature_spec as fs
from dlrm_jax import metric_writer
from dlrm_jax import metrics
from experiments import ablate
from experiments import torchrec_dlrm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, 'configs', 'torchrec_parity.py')

# Our optimizer names -> the twin's table optimizer (torchrec_dlrm.TABLE_OPTIMIZERS): adagrad is
# elementwise on both sides, rowwise_adagrad row-wise on both; the others have no TorchRec
# equivalent with TF's semantics.
TWIN_TABLE_OPTIMIZERS = {'gradientdescent': 'sgd', 'adagrad': 'adagrad',
                         'rowwise_adagrad': 'rowwise_adagrad'}
TWIN_INITS = ('ours', 'torchrec')
# The default initial_accumulator_value: TF's for adagrad, FBGEMM's for rowwise_adagrad.
ADAGRAD_ACCUMULATORS = {'adagrad': 0.1, 'rowwise_adagrad': 0.0}


# ------------------------------------------------------------------------------------------------
# The twin's configuration.

def check_supported(config: ml_collections.ConfigDict) -> None:
  """Refuses configs the comparison cannot run as asked, before anything is trained."""
  if config.optimizer not in TWIN_TABLE_OPTIMIZERS:
    raise ValueError(
        f'optimizer {config.optimizer!r} has no equivalent in the TorchRec twin '
        '(experiments/torchrec_dlrm.py builds SGD, elementwise and row-wise Adagrad only): '
        'use --config.optimizer=gradientdescent, adagrad or rowwise_adagrad')
  epsilon = config.optimizer_hparams.get('epsilon')
  if config.optimizer == 'rowwise_adagrad' and epsilon is not None and epsilon != 1e-8:
    raise ValueError(f'optimizer_hparams.epsilon={epsilon}: the twin runs FBGEMM\'s and '
                     'torch\'s Adagrad at eps 1e-8, rowwise_adagrad\'s default')
  if config.mode != 'train' or config.no_eval:
    raise ValueError('the comparison trains and evaluates: it needs mode=train and no_eval=False')
  if config.interaction_op == 'dcn' and config.bottom_mlp[-1] != config.embedding_dim:
    raise ValueError(
        f'TorchRec\'s DLRM_DCN stacks the bottom MLP\'s output with the embeddings: for '
        f'interaction_op=dcn the bottom MLP must end at embedding_dim={config.embedding_dim}, '
        f'not {config.bottom_mlp[-1]}')


def twin_variant(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The variant dict `torchrec_dlrm.build_model` reads, from our config."""
  check_supported(config)
  return {'table_optimizer': TWIN_TABLE_OPTIMIZERS[config.optimizer],
          'optimizer': config.optimizer, 'learning_rate': float(config.learning_rate),
          'bottom_mlp': tuple(config.bottom_mlp), 'top_mlp': tuple(config.top_mlp),
          'interaction': config.interaction_op, 'batch_norm': bool(config.batch_norm),
          'dcn_num_layers': config.dcn_num_layers, 'dcn_low_rank_dim': config.dcn_low_rank_dim}


def initial_accumulator(config: ml_collections.ConfigDict) -> float:
  value = config.optimizer_hparams.get('initial_accumulator_value')
  return ADAGRAD_ACCUMULATORS[config.optimizer] if value is None else float(value)


def embedding_collection(model: nn.Module):
  return model.sparse_arch.embedding_bag_collection


def draw_like_ours(model: nn.Module, spec: fs.FeatureSpec) -> None:
  """Redraws the twin's weights from our initialisers' distributions (models.init_tables,
  models.dense_init, Flax's zero biases), in place. dcn's cross layers are drawn alike already
  (models.cross_init is TorchRec's xavier_normal_, with zero biases)."""
  std = 1.0 / math.sqrt(spec.embedding_dim)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.startswith('sparse_arch.'):
        # jax.random.truncated_normal(-2, 2) scaled: a normal cut at 2 stddev, not renormalised.
        nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)
    for module in model.modules():
      if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def set_accumulators(model: nn.Module, optimizer: torch.optim.Optimizer, value: float,
                     tables: bool) -> None:
  """Adagrad's accumulators at `value`: the MLPs' always (build_model starts them at 0.1 for
  adagrad, 0 for rowwise_adagrad), the fused tables' only with `tables` (FBGEMM starts them at
  0). A no-op for SGD."""
  with torch.no_grad():
    for state in optimizer.state.values():
      if 'sum' in state:
        state['sum'].fill_(value)
    if tables:
      for state in embedding_collection(model).fused_optimizer().state.values():
        for name, tensor in state.items():
          if name.endswith('momentum_1'):
            tensor.fill_(value)


def build_twin(config: ml_collections.ConfigDict, spec: fs.FeatureSpec, seed: int,
               twin_init: str) -> Tuple[nn.Module, torch.optim.Optimizer]:
  if twin_init not in TWIN_INITS:
    raise ValueError(f'twin_init {twin_init!r}: expected one of {TWIN_INITS}')
  torch.manual_seed(seed)
  model, optimizer = torchrec_dlrm.build_model(twin_variant(config), spec)
  if twin_init == 'ours':
    draw_like_ours(model, spec)
  if config.optimizer in ADAGRAD_ACCUMULATORS:
    set_accumulators(model, optimizer, initial_accumulator(config), tables=twin_init == 'ours')
  return model, optimizer


# ------------------------------------------------------------------------------------------------
# Training and scoring the twin.

def logged_windows(losses: Sequence[float], every: int) -> Tuple[List[int], List[float]]:
  """(steps, mean loss since the previous one) at the steps ours logs train_loss: every
  `every` steps and the last."""
  steps = [s for s in range(1, len(losses) + 1) if s % every == 0 or s == len(losses)]
  starts = [0] + steps[:-1]
  return steps, [float(np.mean(losses[a:b])) for a, b in zip(starts, steps)]


def _forward(model: nn.Module, batch: Dict[str, Any], bf16: bool) -> torch.Tensor:
  with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
    logits = model(batch['dense'], batch['sparse'])
  return logits.float().squeeze(1)


def train_twin(model: nn.Module, optimizer: torch.optim.Optimizer,
               host_batches: Iterable[Dict[str, np.ndarray]], spec: fs.FeatureSpec,
               bf16: bool) -> List[float]:
  """One step per batch (the tables update inside backward); the per-step losses."""
  keys = torchrec_dlrm.feature_order(spec)
  model.train()
  losses = []
  for host in host_batches:
    batch = torchrec_dlrm.to_torch_batch(host, spec, keys)
    loss = nn.functional.binary_cross_entropy_with_logits(_forward(model, batch, bf16),
                                                          batch['label'])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(float(loss.detach()))
  return losses


def score_twin(model: nn.Module, host_batches: Iterable[Dict[str, np.ndarray]],
               spec: fs.FeatureSpec, bf16: bool) -> Dict[str, float]:
  """Our metrics of the twin's probabilities on the real (mask 1) rows, as train.evaluate
  scores ours."""
  keys = torchrec_dlrm.feature_order(spec)
  model.eval()  # batch norm's running statistics, as our eval step
  labels, probs = [], []
  with torch.no_grad():
    for host in host_batches:
      keep = host['mask'] > 0
      batch = torchrec_dlrm.to_torch_batch(host, spec, keys)
      probs.append(torch.sigmoid(_forward(model, batch, bf16)).numpy()[keep])
      labels.append(host['label'][keep] > 0.5)
  return metrics.classification_metrics(np.concatenate(labels), np.concatenate(probs))


def run_twin(config: ml_collections.ConfigDict, spec: fs.FeatureSpec,
             data: data_sources.DataFiles, num_steps: int, twin_init: str) -> Dict[str, Any]:
  model, optimizer = build_twin(config, spec, int(config.seed), twin_init)
  start = time.perf_counter()
  batches = data_sources.train_batches(config, spec, data, num_steps=num_steps)
  try:
    losses = train_twin(model, optimizer, batches, spec, bool(config.bf16))
  finally:
    batches.close()
  train_time = time.perf_counter() - start
  evals = data_sources.eval_batches(config, spec, data)
  try:
    scores = score_twin(model, evals, spec, bool(config.bf16))
  finally:
    if hasattr(evals, 'close'):
      evals.close()
  steps, windows = logged_windows(losses, int(config.log_every_steps))
  return {'steps': len(losses), 'train_time_s': train_time,
          'train_loss': {'steps': steps, 'values': windows},
          **{f'eval_{k}': v for k, v in scores.items()}}


# ------------------------------------------------------------------------------------------------
# Ours.

def run_ours(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  from dlrm_jax import train  # pylint: disable=g-import-not-at-top
  results = train.train_and_evaluate(config, workdir)
  steps, values = metric_writer.read_scalars(workdir, 'train_loss')
  keep = ('steps', 'train_time_s', 'eval_auc', 'eval_logloss', 'eval_accuracy',
          'eval_num_examples', 'oracle_auc', 'oracle_logloss')
  return {**{k: results[k] for k in keep if k in results},
          'train_loss': {'steps': steps.tolist(), 'values': values.tolist()}}


# ------------------------------------------------------------------------------------------------
# Seeds.

def seed_config(base: ml_collections.ConfigDict, seed: int,
                out_dir: str) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  config.seed = int(seed)
  config.output_dir = os.path.join(out_dir, 'data')  # one planted data set for every seed
  config.checkpoint = ''
  return config


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_out_dir(config: ml_collections.ConfigDict, out_dir: str, twin_init: str) -> None:
  """Records the experiment in out_dir, or refuses an out_dir made by another one: its
  finished seeds would be mixed into this table."""
  wanted = {'config': ablate.config_dict(config), 'twin_init': twin_init}
  path = os.path.join(out_dir, 'config.json')
  found = _read_json(path)
  if found is None:
    os.makedirs(out_dir, exist_ok=True)
    metrics.write_json_atomic(path, wanted)
    return
  changed = ablate.changed_fields(found.get('config', {}), wanted['config'], out_dir)
  if found.get('twin_init') != twin_init:
    changed.append(f"--twin_init ({found.get('twin_init')} there)")
  if changed:
    raise ValueError(f'{out_dir} holds a comparison of another config (differing: '
                     f'{", ".join(changed)}; {path}): use a new --out_dir')


def run_seed(base: ml_collections.ConfigDict, seed: int, out_dir: str,
             twin_init: str) -> Dict[str, Any]:
  """Both sides of one seed, or its record read back when it finished before."""
  seed_dir = os.path.join(out_dir, f'seed-{seed}')
  record_path = os.path.join(seed_dir, 'parity.json')
  record = _read_json(record_path)
  if record is not None:
    logging.info('seed %d: finished before; read %s', seed, record_path)
    return record
  config = seed_config(base, seed, out_dir)
  logging.info('seed %d: training ours', seed)
  ours = run_ours(config, os.path.join(seed_dir, 'ours'))
  spec = fs.from_config(config)
  with contextlib.closing(data_sources.resolve(config, spec)) as data:
    # The step count train_and_evaluate ran: config.steps, else one epoch.
    num_steps = ours['steps']
    logging.info('seed %d: training the TorchRec twin for %d steps', seed, num_steps)
    twin = run_twin(config, spec, data, num_steps, twin_init)
  record = {'seed': seed, 'ours': ours, 'torchrec': twin,
            'oracle_auc': ours.get('oracle_auc', float('nan'))}
  logging.info('seed %d: eval AUC ours %.4f, TorchRec %.4f, oracle %.4f', seed,
               ours.get('eval_auc', float('nan')), twin['eval_auc'], record['oracle_auc'])
  metrics.write_json_atomic(record_path, record)
  return record


# ------------------------------------------------------------------------------------------------
# The table and the verdict.

def _mean_std(values: Sequence[Optional[float]]) -> Tuple[float, float]:
  # None: a figure JSON could not hold (NaN), or one the run does not have (no oracle).
  values = np.asarray([np.nan if v is None else v for v in values], np.float64)
  # Sample std (ddof=1): the spread one more seed would show; NaN from one seed.
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float('nan')


def _difference(record: Dict[str, Any]) -> float:
  ours, twin = record['ours']['eval_auc'], record['torchrec']['eval_auc']
  return float('nan') if ours is None or twin is None else ours - twin


def summarize(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Mean and sample std over seeds of each AUC and of the per-seed difference, and the
  difference's standard error."""
  columns = {'ours_auc': [r['ours']['eval_auc'] for r in records],
             'torchrec_auc': [r['torchrec']['eval_auc'] for r in records],
             'oracle_auc': [r['oracle_auc'] for r in records]}
  columns['difference'] = [_difference(r) for r in records]
  out = {'seeds': len(records)}
  for name, values in columns.items():
    out[f'{name}_mean'], out[f'{name}_std'] = _mean_std(values)
  out['difference_se'] = out['difference_std'] / math.sqrt(len(records))
  return out


def verdict(summary: Dict[str, Any]) -> str:
  """One line: whether |mean difference| <= 2 standard errors of the per-seed differences."""
  n, mean, se = summary['seeds'], summary['difference_mean'], summary['difference_se']
  if n < 2 or not np.isfinite(se):
    return (f'No verdict: {n} seed gives no spread to judge the difference of {mean:+.4f} by; '
            'run 2 or more seeds.')
  bound = 2 * se
  if abs(mean) <= bound:
    return (f'Parity not rejected: |mean difference| {abs(mean):.4f} <= 2 SE = {bound:.4f} over '
            f'{n} seeds. The gap is within what seed noise shows here; it does not prove the two '
            f'equal (gaps below ~{bound:.4f} AUC go unseen at {n} seeds), and holds for this '
            'config, data and step count only.')
  return (f'Difference: |mean difference| {abs(mean):.4f} > 2 SE = {bound:.4f} over {n} seeds: '
          'larger than seed noise explains here (a rough screen, not a calibrated test: at 3 '
          "seeds a t-test's 95% bound is 4.3 SE); the module docstring lists where the two "
          'sides differ.')


def _fmt(value: float, signed: bool = False) -> str:
  if value is None or not np.isfinite(value):
    return '–'
  return f'{value:+.4f}' if signed else f'{value:.4f}'


def markdown(records: Sequence[Dict[str, Any]], summary: Dict[str, Any], line: str,
             description: str) -> str:
  header = ('| seed | ours AUC | TorchRec AUC | ours − TorchRec | oracle AUC |\n'
            '|---:|---:|---:|---:|---:|')
  rows = [f"| {r['seed']} | {_fmt(r['ours']['eval_auc'])} | {_fmt(r['torchrec']['eval_auc'])} "
          f"| {_fmt(_difference(r), True)} "
          f"| {_fmt(r['oracle_auc'])} |" for r in records]
  for stat in ('mean', 'std'):
    rows.append(f"| {stat} | {_fmt(summary[f'ours_auc_{stat}'])} "
                f"| {_fmt(summary[f'torchrec_auc_{stat}'])} "
                f"| {_fmt(summary[f'difference_{stat}'], stat == 'mean')} "
                f"| {_fmt(summary[f'oracle_auc_{stat}'])} |")
  return f'{description}\n\n{header}\n' + '\n'.join(rows) + f'\n\n{line}\n'


def describe(config: ml_collections.ConfigDict, twin_init: str) -> str:
  data = (config.data_location or 'planted data (' + ', '.join(
      f'{k}={config.planted[k]}' for k in ('train_rows', 'eval_rows', 'seed')) + ')')
  return (f'{data}; {config.feature_spec} {config.interaction_op}, bottom_mlp '
          f'{tuple(config.bottom_mlp)}, top_mlp {tuple(config.top_mlp)}, batch_norm '
          f'{config.batch_norm}, batch {config.batch_size}, optimizer {config.optimizer}, '
          f'learning_rate {config.learning_rate}, steps {config.steps or "one epoch"}; '
          f'twin_init {twin_init}.')


def run_parity(base: ml_collections.ConfigDict, seeds: Sequence[int], out_dir: str,
               twin_init: str = 'ours', compilation_cache: bool = True) -> Dict[str, Any]:
  """Runs (or reads back) every seed and writes parity.json and parity.md into `out_dir`."""
  check_supported(base)
  if twin_init not in TWIN_INITS:
    raise ValueError(f'twin_init {twin_init!r}: expected one of {TWIN_INITS}')
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds {list(seeds)}: expected distinct seeds')
  check_out_dir(base, out_dir, twin_init)
  with contextlib.ExitStack() as cache:
    if compilation_cache:
      # Seeds after the first only change data: they reuse the first one's compiled programs.
      # For these runs only, as the ablation's: a caller's later compiles stay out of it.
      cache.enter_context(ablate.compilation_cache_in(os.path.join(out_dir, 'jax_cache')))
    records = [run_seed(base, seed, out_dir, twin_init) for seed in seeds]
  summary = summarize(records)
  line = verdict(summary)
  text = markdown(records, summary, line, describe(base, twin_init))
  result = {'description': describe(base, twin_init), 'records': records, 'summary': summary,
            'verdict': line, 'markdown': text}
  metrics.write_json_atomic(os.path.join(out_dir, 'parity.json'), result)
  metrics.write_text_atomic(os.path.join(out_dir, 'parity.md'), text)
  return result


# ------------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined on demand, not at import: a test importing this module must not claim --config."""
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_list('seeds', ['1', '2', '3'], 'Values of config.seed: one pair of runs each.')
  flags.DEFINE_string('out_dir', None, 'Directory of the runs, the data and the table.')
  flags.DEFINE_enum('twin_init', 'ours', list(TWIN_INITS),
                    "The twin's starting state: our initialisers' distributions and Adagrad "
                    "accumulators ('ours'), or TorchRec's and PyTorch's defaults ('torchrec').")
  flags.DEFINE_integer('twin_threads', 0, "The twin's PyTorch threads; 0 = PyTorch's default.")
  flags.mark_flags_as_required(['out_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from dlrm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.quiet_orbax_info()
  if FLAGS.twin_threads:
    torch.set_num_threads(FLAGS.twin_threads)
  config = cli.command_line_config(FLAGS.config)
  out_dir = os.path.expanduser(FLAGS.out_dir)  # '--out_dir=~/x': the shell leaves this '~'
  try:
    check_supported(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:  # checked again by run_parity; here an out_dir of another comparison ends the command
    check_out_dir(config, out_dir, FLAGS.twin_init)  # with one line, not a traceback
  except ValueError as e:
    cli.fail(str(e))
  result = run_parity(config, [int(s) for s in FLAGS.seeds], out_dir, FLAGS.twin_init)
  print('\n' + result['markdown'])
  print(f"{os.path.join(out_dir, 'parity.json')}\n{os.path.join(out_dir, 'parity.md')}")


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
