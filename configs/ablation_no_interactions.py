"""Planted data with no pairwise interaction at all: where `dot` should not beat `cat`.

  python -m experiments.ablate --config=configs/ablation_no_interactions.py \
      --grid interaction_op=dot,cat --seeds 1,2,3 --out_dir runs/ablation_default/no_interactions

The twin of configs/ablation_interactions.py (same model, training and data size) on planted
data whose logit is first order: per-id biases, the price fit and the context and user effects
(linear_weight 2, so the best AUC stays well above chance). Both pairwise terms are off: the
latent-factor products (interaction_weight 0) and the history match (history_weight 0), which a
dot of the pooled history embedding with the candidate's embedding would model exactly.

`--config=configs/ablation_no_interactions.py:tiny` is the seconds-long smoke version.
"""

import ml_collections

from configs import ablation_interactions

PLANTED_WEIGHTS = dict(interaction_weight=0.0, linear_weight=2.0, history_weight=0.0)


def get_config(mode: str = '') -> ml_collections.ConfigDict:
  config = ablation_interactions.get_config(mode)
  config.planted.update(PLANTED_WEIGHTS)
  return config
