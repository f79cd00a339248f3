"""DLRM on the Criteo 1TB click logs: days 0-22 train (4,195,197,692 rows), day 23 evaluates.

  python -m dlrm_jax.main --config=configs/criteo_1tb.py --config.data_location=/data/criteo1tb
  python -m dlrm_jax.main --config=configs/criteo_1tb.py:deeprec ...

data_location holds `day_0` .. `day_23`, each plain or gzip'd as downloaded (`day_5.gz` is
found for `day_5`). Dense features are log(x + 1) with negatives clamped to 0; categoricals are
hashed into per-column tables:
  reference (default): the Facebook reference's table sizes for 1TB with --max-ind-range=10M
    (49.1M rows in all; ids are hashed into them, where the reference maps each distinct value
    to its own row, so a table sized at its column's distinct values leaves ~37% of its rows
    unused and shares the rest), embedding 64, bottom 512-256-64, top 512-512-256, dot interaction,
    batch 2048, as its dlrm_s_criteo_terabyte.sh; the training otherwise DeepRec's (batch norm,
    adamasync at 0.01), where that script has no batch norm and runs SGD at 0.1
    (--config.batch_norm=False --config.optimizer=gradientdescent --config.learning_rate=0.1).
  deeprec: 10000 buckets per column, embedding 16, the default MLPs, with the dot interaction
    (as the reference's variant).
Each day file is cached on its own (under <data_location>/dlrm_cache, ~191 bytes a row, about
800 GB for days 0-22; point cache_dir at a disk with room), so an interrupted first pass keeps
the days it finished and a replaced file rebuilds only its own cache. To cache before training,
start this on one machine, or at once on several sharing cache_dir (a file system with flock):
each takes the days no other is building. A cache holds ids already reduced to the tables'
rows, so it belongs to one variant (one set of table sizes): cache with the variant you train
(`configs/criteo_1tb.py:deeprec` for that one); another variant builds its own ~800 GB beside
it, and the first stays until deleted.
  python -m dlrm_jax.data_sources --config=configs/criteo_1tb.py --config.data_location=...
"""

from configs import default

# Facebook DLRM reference, Criteo Terabyte with --max-ind-range=10000000 (C1..C26).
TERABYTE_REFERENCE_ROWS = (
    9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10, 2208,
    11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36)


def get_config(variant: str = 'reference'):
  if variant not in ('deeprec', 'reference'):
    raise ValueError(f"variant {variant!r}: expected 'deeprec' or 'reference'")
  config = default.get_config()
  config.feature_spec = 'criteo'
  config.data_location = './data/criteo_1tb'
  config.train_files = ','.join(f'day_{d}' for d in range(23))
  config.eval_files = 'day_23'
  config.split_parts = 0
  config.eval_parts = 1
  config.hash_buckets = 10000
  config.criteo_table_rows = ()
  config.interaction_op = 'dot'
  if variant == 'reference':
    config.criteo_table_rows = TERABYTE_REFERENCE_ROWS
    config.embedding_dim = 64
    config.bottom_mlp = (512, 256, 64)
    config.top_mlp = (512, 512, 256)
    config.batch_size = 2048
  return config
