"""The embedded default: DeepRec's DLRM on planted ELM-format data, one epoch, no download.

  python -m dlrm_jax.main --config=configs/default.py

Planted data (train.csv / eval.csv in the real ELM format, plus oracle.json with the best possible
AUC) is generated under output_dir/planted_elm on the first run and reused afterwards. Every field
named like a DeepRec flag means what that flag means.
"""

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from dlrm_jax import datagen


def get_config(mode: str = ''):
  """The default config; mode 'tiny' (`--config=configs/default.py:tiny`) is a seconds-long
  version for tests and smoke runs: tiny tables and MLPs, a small planted world and data."""
  config = ml_collections.ConfigDict()

  # Data.
  config.feature_spec = 'elm'          # 'elm' or 'criteo'
  config.data_location = ''            # '' = planted data under output_dir (see `planted`)
  config.hash_buckets = 100000         # rows of every hashed table
  config.embedding_dim = 16
  config.max_list_len = 50             # history lists keep their first values, mean-pooled
  config.shuffle_buffer = 20000        # the reference's shuffle buffer; 0 keeps file order (with
                                       # the cache: rows per shuffled window of random blocks)
  config.skip_bad_rows = False         # True: drop and count malformed rows instead of stopping
  config.train_files = ''              # names / globs in data_location, comma-separated; '' =
                                       # train.csv (ELM) / train.txt (Criteo); 'x' finds x.gz too;
                                       # TorchRec's .npy triples: their <name>_dense.npy files
  config.eval_files = ''               # the same for evaluation; '' = eval.csv / eval.txt
  config.split_parts = 0               # > 0: cut each train file by line into this many parts
  config.eval_parts = 1                # ... and evaluate on the last eval_parts (Kaggle: 7, 1)
  config.criteo_table_rows = ()        # Criteo: rows of each of the 26 tables; () = hash_buckets
  config.criteo_missing = ' '          # Criteo: what an empty C field reads as: DeepRec's ' ',
                                       # hashed (a learned row); '' = dropped (a zero vector, as
                                       # runs made before this field existed were trained)
  config.use_cache = True              # parse each file once into a binary row cache, read it
                                       # after; False = parse the CSV every epoch
  config.cache_dir = ''                # '' = <data directory>/dlrm_cache
  config.cache_block_rows = 1024       # cache shuffle: blocks of rows visited in random order
  config.num_workers = -1              # CSV parse processes; -1 = one per core (at most 8) for
                                       # files of 64 MB or more, else none
  config.tfds_data_dir = ''            # read the TFDS array_record data set here instead (built
                                       # from data_location's files if missing)
  # The planted world (dlrm_jax/datagen.py, PlantedModel): small enough that one epoch of 1M
  # rows sees every id often, so a DLRM can get close to the oracle; every kind of term is
  # planted (per-id biases, a low-rank user x item/category interaction, history matches,
  # price, hour and rank effects).
  config.planted = planted_world(
      train_rows=1_000_000, eval_rows=100_000, seed=1,
      num_users=2000, num_items=200, num_shops=60, num_foods=100, num_brands=30, num_aois=50,
      num_districts=12, num_cities=3, num_categories=20, history_sharpness=3.0,
      mean_history=20.0, target_ctr=0.06, latent_dim=2, interaction_weight=0.3,
      history_weight=2.0)

  # Model.
  config.bottom_mlp = (512, 256, 64, 16)
  config.top_mlp = (512, 256)
  config.interaction_op = 'cat'        # 'dot', 'cat' or 'dcn' (DCN-v2 cross layers over cat)
  # dcn's cross layers (MLPerf DLRMv2 has 3) and their rank: a quarter of ELM's 400-wide
  # concatenation, TorchRec's advice for keeping a full-rank layer's accuracy (MLPerf: 512 of 3456).
  config.dcn_num_layers = 3
  config.dcn_low_rank_dim = 100
  config.batch_norm = True             # after each bottom-MLP layer, as the reference

  # What to run: 'train' (then evaluate), 'eval' (the newest checkpoint in the run directory on
  # the eval file), or 'predict' (one probability per row of predict_input).
  config.mode = 'train'
  config.predict_input = ''
  config.predict_output = ''           # '' = <run directory>/predictions.txt

  # Training.
  config.steps = 0                     # 0 = one epoch of the train file
  config.batch_size = 512
  config.eval_batch_size = 4096         # global, as batch_size: split over processes and devices
  config.learning_rate = 0.01          # the reference script's value (its README says 0.1)
  # adam, adamasync, adagrad, adagraddecay, gradientdescent; beyond DeepRec, rowwise_adagrad
  config.optimizer = 'adamasync'
  # The optimizer's arguments; unset (None) = its default. Each optimizer takes its own: beta1
  # (0.9), beta2 (0.999), epsilon (1e-8) for adam and adamasync; initial_accumulator_value (0.1)
  # for adagrad and adagraddecay; accumulator_decay_step (100000), accumulator_decay_rate (0.9)
  # and decay_all_missed_periods (True) for adagraddecay; FBGEMM's initial_accumulator_value (0)
  # and epsilon (1e-8) for rowwise_adagrad. E.g.
  # --config.optimizer_hparams.accumulator_decay_step=5000
  config.optimizer_hparams = ml_collections.ConfigDict(dict(
      beta1=placeholder(float), beta2=placeholder(float), epsilon=placeholder(float),
      initial_accumulator_value=placeholder(float), accumulator_decay_step=placeholder(int),
      accumulator_decay_rate=placeholder(float), decay_all_missed_periods=placeholder(bool)))
  config.seed = 2021
  config.no_eval = False
  config.eval_every_steps = 0          # also evaluate every N steps during training (the Facebook
                                       # reference's --test-freq); 0 = only at the end
  config.log_every_steps = 100

  # Output.
  config.output_dir = './result'
  config.checkpoint = ''               # run directory; '' = output_dir/model_DLRM_<timestamp>
  config.save_steps = 0                # 0 = save only at the end
  config.keep_checkpoint_max = 1
  # True: training goes on while a checkpoint is written. On CPU the save reads the state in place,
  # so the steps during it cannot reuse (donate) the state's buffers: 2x the tables until the
  # write is done. False: each save completes first, and the peak stays at one state.
  config.async_checkpointing = True
  config.timeline = 0                  # trace one step every N steps (DeepRec's --timeline),
                                       # from the 11th step of each invocation on; 0 = off
  config.activation_summary_steps = 1000  # zero fractions and histograms of MLP layers; 0 = off
  config.export_dir = ''               # write a serving artifact here after training; '' = none

  # Accelerations (DeepRec's feature flags) and the switch that turns all of them off (--tf).
  config.bf16 = False                  # bfloat16 compute, float32 master weights and loss
  config.emb_fusion = True             # all tables in one array: one gather, one scatter
  config.op_fusion = True              # the whole step as one XLA program
  config.smartstaged = True            # batches read and deduplicated in a thread, ahead
  config.sparse_updates = True         # update only looked-up rows (lazy where the optimizer is)
  config.no_acceleration = False       # True = all of the above off, for A/B runs

  # Devices: ('data', 'model') mesh; -1 = all devices on the data axis.
  # Tables are split by rows over 'model'; the batch over 'data'.
  config.mesh_shape = (-1, 1)
  # XLA:CPU runs each step on the thread that dispatches it (False) instead of a pool thread
  # (True, JAX's default): 23-61 MiB less peak on Criteo at the same speed (set_cpu_dispatch).
  # Set before the process's first JAX computation; GPUs and multi-device CPU steps ignore it.
  config.cpu_async_dispatch = False
  # Multi-process runs: every process starts with the same coordinator_address and its own
  # process_id (e.g. --config.distributed.process_id=$RANK). '' = one process. cpu_collectives:
  # CPU devices of several processes exchange data through gloo (multi-process CPU runs, tests).
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=1, process_id=0, cpu_collectives=False))
  if mode == 'tiny':
    shrink_to_tiny(config)
  elif mode:
    raise ValueError(f"unknown config mode {mode!r}: expected '' or 'tiny'")
  return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Seconds on a laptop CPU; its AUCs say the pipeline learns, not how well DLRM does."""
  config.hash_buckets = 1000
  config.embedding_dim = 4
  config.max_list_len = 8
  config.bottom_mlp = (16, 4)
  config.top_mlp = (16,)
  config.dcn_low_rank_dim = 8
  config.batch_size = 64
  config.eval_batch_size = 512
  config.shuffle_buffer = 256
  config.steps = 40
  config.log_every_steps = 10
  config.activation_summary_steps = 0
  # The generator's default world, shrunk so ids repeat often enough in a few thousand rows.
  config.planted = planted_world(train_rows=8000, eval_rows=3000, seed=1, num_users=2000,
                                 num_items=1000, num_shops=200, num_foods=300)
  return config


def planted_world(**fields) -> ml_collections.ConfigDict:
  """config.planted: `fields`, and every other scalar field of datagen's planted models as a
  placeholder (None: that model's default), so that the command line can set any of them."""
  world = dict(fields)
  for model in datagen.PLANTED_MODELS.values():
    for field in dataclasses.fields(model):
      if field.name not in world and isinstance(field.default, (int, float)):
        world[field.name] = placeholder(type(field.default))
  return ml_collections.ConfigDict(world)
