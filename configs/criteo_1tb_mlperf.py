r"""Criteo 1TB with the MLPerf DLRMv2 sizes: 204M embedding rows of 128, more than one device holds.

  python -m dlrm_jax.planner --config=configs/criteo_1tb_mlperf.py --devices=8 --device_memory_gb=80
  python -m dlrm_jax.main --config=configs/criteo_1tb_mlperf.py \
      --config.data_location=/path/to/criteo_1tb

Sizes from the MLPerf training reference, mlcommons/training `recommendation_v2/torchrec_dlrm`
(README and dlrm_main.py): the 26 categorical features' rows are the Criteo 1TB cardinalities
capped at 40M (`--num_embeddings_per_feature`, the max-ind-range 40M sizes), embedding dim 128,
dense arch 512-256-128, the DCN-v2 interaction (`--interaction_type=dcn`: 3 low-rank cross
layers, rank 512, over the 27 x 128 = 3456-wide concatenation of the dense arch's output and the
pooled embeddings, TorchRec's DLRM_DCN), over arch 1024-1024-512-256-1, global batch 65536,
Adagrad at learning rate 0.005. The fp32 tables alone are 104.5 GB; Adagrad's accumulator
doubles that.

Until 2026-12-07 this config trained `dot` in place of the cross layers: resume or evaluate
such a run with --config.interaction_op=dot.

Where this config differs from DLRMv2:
  * Inputs are one-hot: one id per categorical feature, as in the raw day files. DLRMv2 trains on
    a synthetic multi-hot expansion of them (214 ids per example).
  * Ids are FarmHash Fingerprint64 of the hex strings modulo each table's rows (input_pipeline),
    not MLPerf's preprocessed contiguous ids, so small tables see hash collisions MLPerf does not,
    unless the data are TorchRec's preprocessed .npy files (below): then each id is MLPerf's
    value modulo the table's rows, as its reader computes it.
  * Optimizer: MLPerf's reference runs torch.optim.Adagrad on everything; on the tables TorchRec
    turns it into FBGEMM's fused EXACT_ADAGRAD, applied in the backward pass to the looked-up rows
    only, with a per-element accumulator: the row-wise `adagrad` here keeps the same state (one
    float32 slot like the table) and also touches only the looked-up rows. The reference starts
    the accumulator at 0 with epsilon 1e-10; TensorFlow's Adagrad used here starts it at 0.1 with
    no epsilon. FBGEMM's *row-wise* Adagrad (EXACT_ROWWISE_ADAGRAD, TorchRec's DLRM example's
    table optimizer: one accumulator per row, from 0, eps 1e-8) is
    `--config.optimizer=rowwise_adagrad`: 128x less table state (0.1 GB per device instead of
    13.1 GB on 8 devices) for another optimizer than MLPerf's.
  * No learning-rate warm-up or decay schedule (this codebase has none).
  * Dense features are log(x + 1) with negatives clamped to 0, as the original DLRM reference;
    DLRMv2's preprocessing (TorchRec's criteo utilities) takes log(x - min + 2) over each file,
    which keeps negative values apart (and is what a run on its .npy files reads).
  * The whole of day_23 is evaluated; MLPerf evaluates on its halves (validation and test).

Data: `data_location` holds the day files as downloaded, `day_0` .. `day_22` to train
(4,195,197,692 rows) and `day_23` to evaluate, each plain or gzip'd, cached one file at a time
as `configs/criteo_1tb.py` reads them, but in caches of their own (a cache holds ids reduced to
one set of table sizes). MLPerf's preprocessed files (TorchRec's
`day_<n>_{dense,sparse,labels}.npy`, the contiguous ids named `_sparse.npy`) are read instead with
  --config.train_files='day_?_dense.npy,day_1?_dense.npy,day_2[0-2]_dense.npy' \
  --config.eval_files=day_23_dense.npy
(`dlrm_jax/torchrec_npy.py`), one-hot: the multi-hot `.npz` expansion is not read.

Mesh: tables are split by rows over the 'model' axis, replicated over 'data'; MLPs are replicated
and the batch splits over 'data'. Eight table shards (26 GB of tables and accumulator per device,
53 GB planned in all, 23 GB of it the activations of 65536 rows) leave a third of each 80 GB
accelerator free, so `mesh_shape = (-1, 8)`: (1, 8) on 8 devices, (8, 8) on 64. Four shards also
fit (67 GB planned; the planner's pick, as they halve each device's share of the MLP work) but
leave less room for XLA's workspace, which the plan does not count. See the planner for other
meshes (`--mesh=DATA,MODEL`).
"""

from configs import default

# Rows of the tables of C1..C26, in feature order (the reference's --num_embeddings_per_feature).
MLPERF_DLRMV2_TABLE_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
    11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36)


def get_config():
  config = default.get_config()

  # Data.
  config.feature_spec = 'criteo'
  config.data_location = './data/criteo_1tb'
  config.train_files = ','.join(f'day_{d}' for d in range(23))
  config.eval_files = 'day_23'
  config.criteo_table_rows = MLPERF_DLRMV2_TABLE_ROWS
  config.embedding_dim = 128

  # Model: DLRMv2's dense arch, DCN-v2 interaction and over arch.
  config.bottom_mlp = (512, 256, 128)
  config.interaction_op = 'dcn'             # over [x, e_1..e_26]: 27 x 128 = 3456 wide
  config.dcn_num_layers = 3
  config.dcn_low_rank_dim = 512
  config.top_mlp = (1024, 1024, 512, 256)   # then the logit layer
  config.batch_norm = False                 # DLRMv2's dense arch has none

  # Training.
  config.batch_size = 65536                 # global
  config.eval_batch_size = 65536
  config.optimizer = 'adagrad'
  config.learning_rate = 0.005

  # Devices: eight table shards on the model axis, every other device on data.
  config.mesh_shape = (-1, 8)
  return config
