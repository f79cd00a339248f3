"""The benchmark's reference: the same DLRM built from TorchRec's modules, trained on the CPU.

`experiments/benchmark.py` starts this file as a worker process (one per variant) and drives it
over stdin/stdout; it is not meant to be run by hand. The model mirrors `dlrm_jax.models.DLRM`
layer for layer so that the two sides do the same arithmetic:

* tables: one `EmbeddingBagConfig` per table of the `FeatureSpec`, listing every feature that
  reads it in `feature_names` (TorchRec pools per feature and shares a table that way), all with
  `PoolingType.MEAN` (a list is the mean of its values, a scalar is its one row, a missing scalar
  is an empty bag and pools to zeros, as our weight-0 slot does), in one
  `FusedEmbeddingBagCollection` whose table optimizer runs inside the backward pass (FBGEMM's
  fused kernels): EXACT_SGD, EXACT_ADAGRAD (elementwise as ours, the same work per touched
  row; FBGEMM starts its accumulator at 0 with eps 1e-8, ours at TF's 0.1) or
  EXACT_ROWWISE_ADAGRAD (one accumulator per row, as our rowwise_adagrad);
* dot: `torchrec.models.dlrm.DLRM` (DenseArch, SparseArch, InteractionArch, OverArch);
  cat: the same DenseArch, SparseArch and OverArch over [bottom output, pooled embeddings];
  dcn: `torchrec.models.dlrm.DLRM_DCN` (InteractionDCNArch: a LowRankCrossNet over that
  concatenation), which stacks the bottom output with the embeddings and so needs the bottom
  MLP to end at the embedding dim;
* the bottom MLP gets a BatchNorm1d after each ReLU when our config has batch norm (TF's
  momentum 0.99 is PyTorch's 0.01, epsilon 1e-3), since TorchRec's DenseArch has none;
* the MLPs use torch.optim.SGD or torch.optim.Adagrad (initial accumulator 0.1, as our
  adagrad; 0 with eps 1e-8 beside EXACT_ROWWISE_ADAGRAD, as our rowwise_adagrad);
* bf16 runs the forward under `torch.autocast('cpu', torch.bfloat16)`: bf16 matmuls with fp32
  weights and fp32 embedding tables, the analogue of our `bf16` switch.

Batches are the benchmark's synthetic fixed-shape batches turned into `KeyedJaggedTensor`s once,
before timing (only the weight != 0 slots become values), as our side puts its batches on the
device before timing.
"""

import os
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.models import dlrm as torchrec_dlrm
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Started as `python experiments/torchrec_dlrm.py`: make the repository importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from dlrm_jax import feature_spec as fs  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

# Our optimizer names -> (TorchRec's fused table optimizer, its kwargs beyond the learning rate).
TABLE_OPTIMIZERS = {
    'sgd': (torch.optim.SGD, {}),
    'adagrad': (torch.optim.Adagrad, {'eps': 1e-8}),
    'rowwise_adagrad': (RowWiseAdagrad, {'eps': 1e-8}),  # FBGEMM's default, said
}


def embedding_bag_configs(spec: fs.FeatureSpec) -> List[EmbeddingBagConfig]:
  """One config per table, naming every feature that reads it, mean-pooled."""
  configs = []
  for table in spec.tables:
    features = [f.column for f in spec.sparse if f.table == table.name]
    configs.append(EmbeddingBagConfig(
        name=table.name, embedding_dim=table.dim, num_embeddings=table.rows,
        feature_names=features, pooling=PoolingType.MEAN))
  return configs


def feature_order(spec: fs.FeatureSpec) -> List[str]:
  """The features in the order SparseArch emits them (table by table)."""
  return [name for config in embedding_bag_configs(spec) for name in config.feature_names]


def batch_norm_mlp(in_features: int, widths: Sequence[int]) -> nn.Sequential:
  """Linear -> ReLU -> BatchNorm1d per layer: our bottom MLP with `batch_norm=True`."""
  layers = []
  for width in widths:
    layers += [nn.Linear(in_features, width), nn.ReLU(),
               nn.BatchNorm1d(width, eps=1e-3, momentum=0.01)]
    in_features = width
  return nn.Sequential(*layers)


class CatDLRM(nn.Module):
  """TorchRec's arches with `cat` interaction: OverArch([bottom output, pooled embeddings])."""

  def __init__(self, ebc: FusedEmbeddingBagCollection, dense_in_features: int,
               dense_arch_layer_sizes: Sequence[int], over_arch_layer_sizes: Sequence[int]):
    super().__init__()
    self.sparse_arch = torchrec_dlrm.SparseArch(ebc)
    self.dense_arch = torchrec_dlrm.DenseArch(dense_in_features, list(dense_arch_layer_sizes))
    dim = ebc.embedding_bag_configs()[0].embedding_dim
    over_in = dense_arch_layer_sizes[-1] + self.sparse_arch.F * dim
    self.over_arch = torchrec_dlrm.OverArch(over_in, list(over_arch_layer_sizes))

  def forward(self, dense_features: torch.Tensor,
              sparse_features: KeyedJaggedTensor) -> torch.Tensor:
    x = self.dense_arch(dense_features)
    embedded = self.sparse_arch(sparse_features)
    return self.over_arch(torch.cat([x, embedded.flatten(1)], dim=1))


def build_model(variant: Dict[str, Any], spec: fs.FeatureSpec
                ) -> Tuple[nn.Module, torch.optim.Optimizer]:
  """The model with its fused table optimizer, and the optimizer of its MLPs."""
  table_optimizer, extra = TABLE_OPTIMIZERS[variant['table_optimizer']]
  lr = variant['learning_rate']
  ebc = FusedEmbeddingBagCollection(
      tables=embedding_bag_configs(spec), optimizer_type=table_optimizer,
      optimizer_kwargs={'lr': lr, **extra}, device=torch.device('cpu'))
  bottom, top = list(variant['bottom_mlp']), list(variant['top_mlp']) + [1]
  if variant['interaction'] == 'dot':
    model = torchrec_dlrm.DLRM(
        embedding_bag_collection=ebc, dense_in_features=spec.num_dense,
        dense_arch_layer_sizes=bottom, over_arch_layer_sizes=top)
  elif variant['interaction'] == 'cat':
    model = CatDLRM(ebc, spec.num_dense, bottom, top)
  elif variant['interaction'] == 'dcn':
    model = torchrec_dlrm.DLRM_DCN(
        embedding_bag_collection=ebc, dense_in_features=spec.num_dense,
        dense_arch_layer_sizes=bottom, over_arch_layer_sizes=top,
        dcn_num_layers=variant['dcn_num_layers'], dcn_low_rank_dim=variant['dcn_low_rank_dim'])
  else:
    raise ValueError(f"interaction {variant['interaction']!r}: expected 'dot', 'cat' or 'dcn'")
  if variant['batch_norm']:
    model.dense_arch.model = batch_norm_mlp(spec.num_dense, bottom)
  # The fused tables update themselves in backward: only the MLPs go to a torch optimizer.
  dense_params = [p for name, p in model.named_parameters()
                  if not name.startswith('sparse_arch.')]
  if variant['optimizer'] == 'gradientdescent':
    optimizer = torch.optim.SGD(dense_params, lr=lr)
  elif variant['optimizer'] == 'adagrad':
    optimizer = torch.optim.Adagrad(dense_params, lr=lr, initial_accumulator_value=0.1)
  elif variant['optimizer'] == 'rowwise_adagrad':  # ours' MLP form: FBGEMM's start and eps
    optimizer = torch.optim.Adagrad(dense_params, lr=lr, initial_accumulator_value=0.0,
                                    eps=1e-8)
  else:
    raise ValueError(f"optimizer {variant['optimizer']!r}: the benchmark compares "
                     "'gradientdescent', 'adagrad' and 'rowwise_adagrad'")
  return model, optimizer


def to_torch_batch(batch: Dict[str, np.ndarray], spec: fs.FeatureSpec,
                   keys: Sequence[str]) -> Dict[str, Any]:
  """Fixed-shape batch -> dense tensor, labels and a KeyedJaggedTensor of the real slots."""
  values, lengths = [], []
  by_column = {f.column: (f, start) for f, start in zip(spec.sparse, spec.slot_starts[:-1])}
  for key in keys:
    feature, start = by_column[key]
    window = slice(start, start + feature.max_len)
    present = batch['weights'][:, window] != 0
    values.append(batch['ids'][:, window][present])  # row-major: sample by sample
    lengths.append(present.sum(axis=1))
  kjt = KeyedJaggedTensor(
      keys=list(keys),
      values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
      lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)))
  return {'dense': torch.from_numpy(batch['dense']), 'sparse': kjt,
          'label': torch.from_numpy(batch['label'])}


class TorchRecRunner:
  """Builds the model for one variant and runs training steps on the prepared batches."""

  def __init__(self, variant: Dict[str, Any], host_batches: List[Dict[str, np.ndarray]]):
    torch.set_num_threads(variant['torch_threads'])
    torch.manual_seed(variant['seed'])
    # The runtime's own memory (Python, torch, torchrec, fbgemm), before the model's first tensor.
    self.memory = {'runtime_rss_mb': benchmark.rss_mb()}
    self.spec = benchmark.make_spec(variant)
    self.model, self.optimizer = build_model(variant, self.spec)
    self.model.train()
    keys = feature_order(self.spec)
    self.batches = [to_torch_batch(b, self.spec, keys) for b in host_batches]
    self.bf16 = variant['bf16']
    self.count = 0
    self.last_loss = float('nan')

  def _step(self, batch):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.model(batch['dense'], batch['sparse'])
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float().squeeze(1),
                                                          batch['label'])
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss

  def warm_up(self) -> None:
    self.time_steps('step', len(self.batches) + 1)

  def time_steps(self, kind: str, n: int) -> float:
    """Seconds for n training steps (TorchRec has one kind: 'step')."""
    if kind != 'step':
      raise ValueError(f'TorchRec runs only the step, not {kind!r}')
    start = time.perf_counter()
    loss = None
    for _ in range(n):
      loss = self._step(self.batches[self.count % len(self.batches)])
      self.count += 1
    seconds = time.perf_counter() - start
    if loss is not None:
      self.last_loss = float(loss.detach())
    return seconds

  def extra_measurements(self) -> Dict[str, float]:
    return {}


if __name__ == '__main__':
  benchmark.serve(TorchRecRunner)
