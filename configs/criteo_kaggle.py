"""DLRM on Criteo Kaggle (train.txt, 45,840,617 rows): 6 days train, the 7th evaluates.

  python -m dlrm_jax.main --config=configs/criteo_kaggle.py --config.data_location=/data/criteo
  python -m dlrm_jax.main --config=configs/criteo_kaggle.py:reference --config.data_location=...

data_location holds `train.txt` (or `train.txt.gz`) from the Kaggle Display Advertising
Challenge. As in the Facebook reference, its lines are cut into 7 equal "days" in file order
and days 0-5 train; all of day 6 is the eval set, where the reference splits day 6 in two and
tests on the first half (its AUC is over half as many rows: not directly comparable), and the
7-way cut's spare rows (45,840,617 = 7 x 6,548,659 + 4) fall on days 1, 3, 5 and 6 here (day k
starts at line floor(k x rows / 7)), on the first four days there. Dense features are log(x + 1) of the integers with
negatives clamped to 0; each categorical is hashed (FarmHash, as TensorFlow) into its own table:
  deeprec (default): 10000 buckets per column, embedding 16 (DeepRec's Criteo DLRM,
    modelzoo/dlrm, as its default feature columns build it). Two things follow the Facebook
    reference instead, in every variant: the `dot` interaction (DeepRec's script defaults to
    `cat`: --config.interaction_op=cat) and the log(x + 1) of the integers (DeepRec feeds them
    raw to the bottom MLP).
  deeprec_tables: DeepRec's per-column HASH_BUCKET_SIZES (20 .. 5M, 19.0M rows in all), which
    its DLRM sizes the tables with under --adaptive_emb; the tables of the README's Criteo
    speed and memory figures ("DeepRec's Criteo tables", experiments/benchmark.py).
  reference: the Facebook reference's Kaggle table sizes (its per-column cardinalities), so
    tables hold 33.8M rows in all (ids are hashed into them, where the reference maps each
    distinct value to its own row: ~37% of a table's rows go unused, the rest shared), and its
    Kaggle script's MLP shapes (dot interaction, 512-256-64-16 / 512-256). The training stays
    DeepRec's (batch norm in the bottom MLP, adamasync at 0.01, batch 512), where the
    reference's script has no batch norm and runs SGD at 0.1 on batches of 128: add
    --config.batch_norm=False --config.optimizer=gradientdescent --config.learning_rate=0.1
    --config.batch_size=128 for that.
The first run parses train.txt once into the row cache (<data_location>/dlrm_cache, about 191
bytes per row, all 26 ids stored: 8.8 GB) and every later epoch and run of the same variant
reads the cache (its ids are reduced to the variant's table sizes: each variant has its own).
Without the files the run stops and says where they come from; a stand-in of the same format:
  python -m dlrm_jax.datagen criteo --out_dir /data/criteo --train_rows 1000000 --eval_rows 1 \
      --seed 1
"""

from configs import default

# The Facebook DLRM reference's Kaggle embedding table sizes (C1..C26).
KAGGLE_REFERENCE_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)


# DeepRec's DLRM on Criteo (modelzoo/dlrm/train.py HASH_BUCKET_SIZES, C1..C26).
DEEPREC_TABLE_ROWS = (
    2500, 2000, 5000000, 1500000, 1000, 100, 20000, 4000, 20, 100000, 10000, 5000000, 40000, 100,
    100, 3000000, 50, 10000, 4000, 20, 4000000, 100, 100, 250000, 400, 100000)

VARIANT_TABLE_ROWS = {'deeprec': (), 'deeprec_tables': DEEPREC_TABLE_ROWS,
                      'reference': KAGGLE_REFERENCE_ROWS}


def get_config(variant: str = 'deeprec'):
  if variant not in VARIANT_TABLE_ROWS:
    raise ValueError(f'variant {variant!r}: expected one of {", ".join(VARIANT_TABLE_ROWS)}')
  config = default.get_config()
  config.feature_spec = 'criteo'
  config.data_location = './data/criteo_kaggle'
  config.train_files = 'train.txt'     # a name also finds its .gz
  config.eval_files = ''               # unused: the eval set is the last part of train.txt
  config.split_parts = 7               # train.txt holds 7 days, in time order
  config.eval_parts = 1                # ... the last of which is evaluated on
  config.hash_buckets = 10000
  config.criteo_table_rows = VARIANT_TABLE_ROWS[variant]  # () = hash_buckets each
  config.embedding_dim = 16
  config.bottom_mlp = (512, 256, 64, 16)
  config.top_mlp = (512, 256)
  config.interaction_op = 'dot'
  # Evaluated in batches of the train batch size, as DeepRec does (a command-line batch_size does
  # not carry over: set eval_batch_size too). At 4096 the eval program's temporaries (the dot
  # interaction's [4096, 27, 27] products among them) add 25 MiB on top of the tables and set the
  # run's peak; at 512 evaluation takes 7-12% longer.
  config.eval_batch_size = config.batch_size
  # Each save completes before the next step: on CPU an asynchronous save holds the tables while
  # the steps after it allocate new ones (2x the state: 3.4 GB more with deeprec_tables and
  # adamasync); a save of those tables stalls training for ~5 s instead.
  config.async_checkpointing = False
  return config
