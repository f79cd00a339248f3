"""The default model on 100k rows of the default planted world, trained with Adagrad: what
experiments/torchrec_parity.py compares with its TorchRec twin.

  python -m experiments.torchrec_parity --config=configs/torchrec_parity.py --seeds 1,2,3 \
      --out_dir runs/torchrec_parity

Adagrad, not the default adamasync: the TorchRec twin (experiments/torchrec_dlrm.py) has SGD and
Adagrad (elementwise and row-wise) only. One epoch of 100k rows is 196 steps of 512: about 40 s a seed (both sides) on two
quiet cores (the README's run). `--config=configs/torchrec_parity.py:tiny` is a seconds-long smoke run: its AUCs mean
nothing.
"""

import ml_collections

from configs import default


def get_config(mode: str = '') -> ml_collections.ConfigDict:
  config = default.get_config(mode)
  config.optimizer = 'adagrad'
  # At DeepRec's 0.01 Adagrad barely moves the tables in 196 steps, and the two sides would agree
  # for the wrong reason. Seed 1's eval AUC (ours) by learning rate: 0.05 0.711, 0.2 0.750,
  # 0.5 0.780, oracle 0.841.
  config.learning_rate = 0.2
  if not mode:
    # The default world (every id seen tens of times in 100k rows), a tenth of its rows.
    config.planted.train_rows = 100_000
    config.planted.eval_rows = 50_000
  config.activation_summary_steps = 0
  return config
