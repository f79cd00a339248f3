"""experiments/torchrec_parity.py on a tiny config: both sides train and score the same rows.

Skipped where torch or torchrec does not import, which is CI (they are not among the project's
test dependencies; experiments/README.md says how to install them). The end-to-end test trains
one seed of a tiny model on 1000 planted rows: well under 30 s on two cores.
"""

import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchrec')

# pylint: disable=g-import-not-at-top,wrong-import-position
import train_helpers as th
from dlrm_jax import data_sources
from dlrm_jax import feature_spec as fs
from dlrm_jax import models
from experiments import torchrec_dlrm
from experiments import torchrec_parity
# pylint: enable=g-import-not-at-top,wrong-import-position


def tiny(tmp_path, **overrides):
  return th.tiny_config(tmp_path, **{
      'optimizer': 'adagrad', 'learning_rate': 0.05, 'steps': 8,
      'planted': {'train_rows': 1000, 'eval_rows': 500}, **overrides})


def test_one_seed_end_to_end(tmp_path, no_compilation_cache):
  del no_compilation_cache  # used for its effect: a caller with no cache of its own
  import jax  # pylint: disable=g-import-not-at-top
  out_dir = str(tmp_path / 'parity')
  result = torchrec_parity.run_parity(tiny(tmp_path), [1], out_dir)
  # Its runs compiled into out_dir's cache, which is off again for the caller's later compiles.
  assert os.listdir(os.path.join(out_dir, 'jax_cache'))
  assert not jax.config.jax_compilation_cache_dir
  (record,) = result['records']
  ours, twin = record['ours'], record['torchrec']
  assert ours['steps'] == twin['steps'] == 8
  # The same eval rows on both sides, all of the planted eval file (the one oracle.json scores).
  assert ours['eval_num_examples'] == twin['eval_num_examples'] == 500
  for auc in (ours['eval_auc'], twin['eval_auc'], record['oracle_auc']):
    assert 0.0 < auc < 1.0
  # The twin logs its loss at the steps ours does (log_every_steps 10: only the last).
  assert twin['train_loss']['steps'] == ours['train_loss']['steps'] == [8]
  assert all(math.isfinite(v) for v in twin['train_loss']['values'])
  assert result['verdict'].startswith('No verdict')  # one seed has no spread
  with open(os.path.join(out_dir, 'parity.json')) as f:
    assert json.load(f)['records'][0]['seed'] == 1
  with open(os.path.join(out_dir, 'parity.md')) as f:
    assert '| 1 |' in f.read()
  # A rerun reads the finished seed back instead of training it again.
  again = torchrec_parity.run_parity(tiny(tmp_path), [1], out_dir, compilation_cache=False)
  assert again['records'] == json.loads(json.dumps(result['records']))
  with pytest.raises(ValueError, match=r'another config \(differing: learning_rate;'):
    torchrec_parity.run_parity(tiny(tmp_path, learning_rate=0.1), [1], out_dir,
                               compilation_cache=False)


def test_an_out_dir_of_another_experiment_is_refused_naming_what_differs(tmp_path):
  out_dir = str(tmp_path / 'parity')
  torchrec_parity.check_out_dir(tiny(tmp_path), out_dir, 'ours')
  torchrec_parity.check_out_dir(tiny(tmp_path), out_dir, 'ours')  # the same experiment
  with pytest.raises(ValueError, match=r'differing: learning_rate, steps;'):
    torchrec_parity.check_out_dir(tiny(tmp_path, learning_rate=0.1, steps=9), out_dir, 'ours')
  with pytest.raises(ValueError, match=r'differing: --twin_init \(ours there\);'):
    torchrec_parity.check_out_dir(tiny(tmp_path), out_dir, 'torchrec')
  # Moved: only where its runs write (output_dir) changed, so its seeds still count.
  moved = str(tmp_path / 'moved')
  os.rename(out_dir, moved)
  torchrec_parity.check_out_dir(tiny(tmp_path / 'elsewhere'), moved, 'ours')
  # Recorded by an older version without a field: its default kept the old behaviour.
  with open(os.path.join(moved, 'config.json')) as f:
    recorded = json.load(f)
  del recorded['config']['cpu_async_dispatch']
  with open(os.path.join(moved, 'config.json'), 'w') as f:
    json.dump(recorded, f)
  torchrec_parity.check_out_dir(tiny(tmp_path), moved, 'ours')


def test_twin_reads_the_rows_ours_trains_on(tmp_path):
  # Ours reads compact batches, the twin padded ones: the same rows in the same order.
  config = tiny(tmp_path)
  spec = fs.from_config(config)
  data = data_sources.resolve(config, spec)
  try:
    padded = data_sources.train_batches(config, spec, data, num_steps=3)
    compact = data_sources.train_batches(config, spec, data, num_steps=3, compact=True)
    for a, b in zip(padded, compact, strict=True):
      np.testing.assert_array_equal(a['label'], b['label'])
      np.testing.assert_array_equal(a['dense'], b['dense'])
  finally:
    data.close()


def test_twin_starts_from_our_distributions(tmp_path):
  config = tiny(tmp_path, hash_buckets=5000)
  spec = fs.from_config(config)
  model, optimizer = torchrec_parity.build_twin(config, spec, seed=1, twin_init='ours')
  tables = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                      if n.startswith('sparse_arch.')])
  std = 1 / math.sqrt(spec.embedding_dim)
  assert tables.abs().max() <= 2 * std
  # A normal cut at 2 stddev keeps 0.88 of its stddev; 52k draws pin it to well within 2%.
  assert abs(tables.std().item() / std - 0.88) < 0.02
  ebc = torchrec_parity.embedding_collection(model)
  for state in ebc.fused_optimizer().state.values():
    for tensor in state.values():
      assert torch.all(tensor == 0.1)
  for state in optimizer.state.values():
    assert torch.all(state['sum'] == 0.1)
  biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
  assert biases and all(torch.all(b == 0) for b in biases)


@pytest.mark.parametrize('start', [None, 0.25])
def test_a_rowwise_adagrad_twin_is_fbgemms_exact_rowwise_adagrad(tmp_path, start):
  # The tables' fused optimizer keeps one accumulator per row, and every accumulator (tables
  # and MLPs) starts where ours does: FBGEMM's 0 unless set.
  config = tiny(tmp_path, optimizer='rowwise_adagrad')
  config.optimizer_hparams.initial_accumulator_value = start
  spec = fs.from_config(config)
  model, optimizer = torchrec_parity.build_twin(config, spec, seed=1, twin_init='ours')
  ebc = torchrec_parity.embedding_collection(model)
  slots = [t for state in ebc.fused_optimizer().state.values() for t in state.values()]
  assert slots and all(t.ndim == 1 and torch.all(t == (start or 0.0)) for t in slots)
  assert sum(t.numel() for t in slots) == sum(t.rows for t in spec.tables)
  assert isinstance(optimizer, torch.optim.Adagrad) and optimizer.defaults['eps'] == 1e-8
  assert all(torch.all(s['sum'] == (start or 0.0)) for s in optimizer.state.values())
  config.optimizer_hparams.epsilon = 1e-8  # FBGEMM's, named: taken
  assert torchrec_parity.twin_variant(config)['table_optimizer'] == 'rowwise_adagrad'
  config.optimizer_hparams.epsilon = 1e-10
  with pytest.raises(ValueError, match='optimizer_hparams.epsilon=1e-10: the twin runs'):
    torchrec_parity.twin_variant(config)


def test_refuses_optimizers_the_twin_lacks(tmp_path):
  with pytest.raises(ValueError, match='no equivalent in the TorchRec twin'):
    torchrec_parity.run_parity(tiny(tmp_path, optimizer='adamasync'), [1], str(tmp_path / 'x'))


def test_verdict_compares_the_mean_difference_with_two_standard_errors():
  def records(differences):
    return [{'seed': i, 'oracle_auc': 0.8, 'ours': {'eval_auc': 0.7 + d},
             'torchrec': {'eval_auc': 0.7}} for i, d in enumerate(differences)]
  # Mean 0.001, std 0.002, SE 0.00115: within 2 SE.
  close = torchrec_parity.summarize(records([0.003, 0.001, -0.001]))
  assert close['difference_mean'] == pytest.approx(0.001)
  assert close['difference_se'] == pytest.approx(0.002 / math.sqrt(3))
  assert torchrec_parity.verdict(close).startswith('Parity not rejected')
  # Mean 0.01, SE 0.00058: far outside.
  far = torchrec_parity.summarize(records([0.011, 0.01, 0.009]))
  assert torchrec_parity.verdict(far).startswith('Difference')


def test_the_command_refuses_an_out_dir_of_another_experiment_in_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from configs import torchrec_parity as parity_config  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out_dir = str(tmp_path / 'parity')
  other = parity_config.get_config()
  other.learning_rate *= 2
  torchrec_parity.check_out_dir(other, out_dir, 'ours')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
  run = subprocess.run([sys.executable, '-m', 'experiments.torchrec_parity',
                        '--config=configs/torchrec_parity.py', f'--out_dir={out_dir}',
                        '--seeds=1'], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  # It used to end in a traceback of the ValueError (the message was in its last line).
  assert run.returncode == 1 and 'differing: learning_rate' in run.stderr, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  assert sorted(os.listdir(out_dir)) == ['config.json']  # nothing trained into it


def _twin(**overrides):
  spec = fs.elm_spec(hash_buckets=1000, embedding_dim=4, max_list_len=8)
  variant = {'table_optimizer': 'sgd', 'optimizer': 'gradientdescent', 'learning_rate': 0.05,
             'bottom_mlp': (16, 8, 4), 'top_mlp': (16, 8), 'interaction': 'dot',
             'batch_norm': True, **overrides}
  model, optimizer = torchrec_dlrm.build_model(variant, spec)
  return spec, variant, model, optimizer


def _linear_shapes(module):
  return [(m.in_features, m.out_features) for m in module.modules()
          if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize('interaction', ['dot', 'cat', 'dcn'])
def test_twin_layers_are_ours(interaction):
  spec, variant, model, _ = _twin(interaction=interaction, dcn_num_layers=2, dcn_low_rank_dim=3)
  bottom, top = variant['bottom_mlp'], variant['top_mlp']
  assert _linear_shapes(model.dense_arch) == list(zip((spec.num_dense,) + bottom, bottom))
  # The top MLP reads what our interaction writes (dot: the pairs below the diagonal), then
  # every top layer, then the logit.
  top_in = models.interaction_width(spec, bottom[-1], interaction)
  assert _linear_shapes(model.over_arch) == list(zip((top_in,) + top, top + (1,)))
  # Batch norm after each bottom ReLU, with TF's momentum 0.99 (PyTorch's 0.01) and eps 1e-3.
  layers = list(model.dense_arch.model)
  assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.ReLU,
                                       torch.nn.BatchNorm1d] * len(bottom)
  for norm in layers[2::3]:
    assert norm.momentum == pytest.approx(0.01) and norm.eps == pytest.approx(1e-3)
  if interaction == 'dcn':  # TorchRec's W [N, r] and V [r, N] are our W^T and V^T
    cross = model.inter_arch.crossnet
    assert [tuple(w.shape) for w in cross.W_kernels] == [(top_in, 3)] * 2
    assert [tuple(v.shape) for v in cross.V_kernels] == [(3, top_in)] * 2


def test_twin_of_a_dcn_run_needs_the_bottom_mlp_at_the_embedding_dim(tmp_path):
  # TorchRec stacks the bottom output with the embeddings; ours concatenates and would not mind.
  config = th.tiny_config(tmp_path, interaction_op='dcn', bottom_mlp=(16, 8),
                          optimizer='gradientdescent')
  with pytest.raises(ValueError, match='bottom MLP must end at embedding_dim=4, not 8'):
    torchrec_parity.twin_variant(config)
  config.bottom_mlp = (16, 4)
  variant = torchrec_parity.twin_variant(config)
  assert (variant['dcn_num_layers'], variant['dcn_low_rank_dim']) == (3, 8)


def test_twin_without_batch_norm_has_none():
  _, _, model, _ = _twin(batch_norm=False)
  assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


@pytest.mark.parametrize('optimizer,table_optimizer', [('gradientdescent', 'sgd'),
                                                       ('adagrad', 'adagrad')])
def test_twin_trains_at_our_learning_rate_with_mean_pooling(optimizer, table_optimizer):
  _, _, model, mlp_optimizer = _twin(optimizer=optimizer, table_optimizer=table_optimizer)
  assert [g['lr'] for g in mlp_optimizer.param_groups] == [0.05]
  if optimizer == 'adagrad':
    assert mlp_optimizer.defaults['initial_accumulator_value'] == 0.1  # as ours
  tables = model.sparse_arch.embedding_bag_collection
  table_lrs = [g['lr'] for g in tables.fused_optimizer().param_groups]
  assert table_lrs and all(lr == pytest.approx(0.05) for lr in table_lrs)  # stored as float32
  # The MLPs' optimizer holds every parameter but the (fused) tables'.
  mlp = {id(p) for g in mlp_optimizer.param_groups for p in g['params']}
  assert mlp == {id(p) for n, p in model.named_parameters() if not n.startswith('sparse_arch.')}
  assert all(c.pooling.name == 'MEAN' for c in tables.embedding_bag_configs())


def test_rowwise_adagrad_is_fbgemms_fused_exact_rowwise_adagrad():
  # Ours against FBGEMM's kernel itself, as TorchRec runs it in backward: three steps of bags
  # with repeated ids, SUM pooling so that each looked-up row's gradient is its bag's. Both run
  # float32 (FBGEMM: lr / (sqrt(acc) + eps) * g; ours lr * (g / (sqrt(acc) + eps))): a few ulps.
  from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
  from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
  from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
  import jax.numpy as jnp
  from dlrm_jax import optimizers
  rows, dim, lr = 8, 4, 0.1
  ebc = FusedEmbeddingBagCollection(
      tables=[EmbeddingBagConfig(name='t', embedding_dim=dim, num_embeddings=rows,
                                 feature_names=['f'], pooling=PoolingType.SUM)],
      optimizer_type=torchrec_dlrm.TABLE_OPTIMIZERS['rowwise_adagrad'][0],
      optimizer_kwargs={'lr': lr, **torchrec_dlrm.TABLE_OPTIMIZERS['rowwise_adagrad'][1]},
      device=torch.device('cpu'))
  start = ebc.state_dict()['embedding_bags.t.weight'].detach().numpy().copy()
  table = jnp.asarray(start)
  opt = optimizers.create_sparse('rowwise_adagrad', lr)
  state = opt.init(table)
  rng = np.random.default_rng(0)
  lengths = np.array([2, 1, 3])
  for _ in range(3):
    ids = rng.integers(0, rows, size=int(lengths.sum()))
    coef = rng.normal(size=(len(lengths), dim)).astype(np.float32)
    pooled = ebc(KeyedJaggedTensor(keys=['f'], values=torch.from_numpy(ids),
                                   lengths=torch.from_numpy(lengths)))['f']
    (pooled * torch.from_numpy(coef)).sum().backward()
    unique, summed = optimizers.dedup_rows(jnp.asarray(ids), jnp.asarray(
        coef[np.repeat(np.arange(len(lengths)), lengths)]), rows)
    table, state = opt.update(table, state, unique, summed)
  theirs = ebc.state_dict()['embedding_bags.t.weight'].detach().numpy()
  assert np.abs(theirs - start).max() > 0.1  # it trained
  np.testing.assert_allclose(np.asarray(table), theirs, rtol=1e-5, atol=1e-6)
  accumulator, = [t for s in ebc.fused_optimizer().state.values() for t in s.values()]
  np.testing.assert_allclose(np.asarray(state.accumulator)[:, 0],
                             accumulator.detach().numpy(), rtol=1e-5)

