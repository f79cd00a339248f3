"""Planted data whose clicks come from strong pairwise latent interactions: where `dot` should win.

  python -m experiments.ablate --config=configs/ablation_interactions.py \
      --grid interaction_op=dot,cat --seeds 1,2,3 --out_dir runs/ablation_default/interactions

The default model and training on planted data whose logit has a pairwise term of standard
deviation 2 (user x item and user x category factor products; the generator's default is 0.6,
the embedded default config's 0.3) beside the default first-order and history-match terms. A dot product of two embeddings is that term's
exact form, which `cat` must approximate with its top MLP. The twin setting without any
pairwise term is configs/ablation_no_interactions.py; the README compares the two.

`--config=configs/ablation_interactions.py:tiny` is a seconds-long version (tiny tables, MLPs,
planted world and data) for tests and notebook smoke runs: its numbers mean nothing.
"""

import ml_collections

from configs import default

# The planted model's term weights (dlrm_jax/datagen.py, PlantedModel): interaction_weight is
# the standard deviation of the latent-factor products, the other two scale their terms.
PLANTED_WEIGHTS = dict(interaction_weight=2.0, linear_weight=1.0, history_weight=1.0)


def get_config(mode: str = '') -> ml_collections.ConfigDict:
  config = default.get_config(mode)
  if not mode:
    # The generator's default world and 400k rows, as the README's ablation table was run.
    config.planted = default.planted_world(train_rows=400_000, eval_rows=100_000, seed=1)
  config.planted.update(PLANTED_WEIGHTS)
  return config
