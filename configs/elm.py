"""DeepRec's DLRM on the real Ali ELM files: data_location must hold train.csv and eval.csv.

  python -m dlrm_jax.main --config=configs/elm.py --config.data_location=/path/to/elm

Without the files the run stops and says where they come from and how to generate a stand-in.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data_location = './data'
  return config
