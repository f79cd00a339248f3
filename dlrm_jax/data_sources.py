"""Which files a run reads: the user's data under `data_location`, or planted data.

An empty `data_location` means the embedded default: planted data of the spec's format is
generated under `output_dir` (reused when an identical data set is already there), together with
its oracle AUC and logloss, so a run needs no download and knows its best possible score.
"""

import dataclasses
import os
from typing import Dict

from dlrm_jax import datagen
from dlrm_jax import feature_spec as fs
from dlrm_jax import input_pipeline

# The file names each format is read from inside data_location.
FILE_NAMES = {'elm': ('train.csv', 'eval.csv'), 'criteo': ('train.txt', 'eval.txt')}

WHERE_TO_GET = {
    'elm': ('The Ali ELM (Ele.me) data set is on Alibaba Tianchi: '
            'https://tianchi.aliyun.com/dataset/dataDetail?dataId=131047 ; concatenate the day '
            'files into train.csv (days 1-7) and eval.csv (day 8).'),
    'criteo': ('Criteo Kaggle (train.txt) and Criteo 1TB (day_0..day_23) come from '
               'https://ailab.criteo.com/ressources/ ; split them into train.txt and eval.txt.'),
}


@dataclasses.dataclass(frozen=True)
class DataFiles:
  train_path: str
  eval_path: str
  train_rows: int
  oracle: Dict[str, float]


def resolve(config, spec: fs.FeatureSpec) -> DataFiles:
  train_name, eval_name = FILE_NAMES[spec.name]
  if config.data_location:
    directory = config.data_location
    oracle = {}
  else:
    directory = os.path.join(config.output_dir, f'planted_{spec.name}')
    planted = config.planted.to_dict()
    oracle = datagen.ensure_planted_data(directory, spec.name, **planted)
    oracle = {k: v for k, v in oracle.items() if k in ('oracle_auc', 'oracle_logloss')}
  train_path = os.path.join(directory, train_name)
  eval_path = os.path.join(directory, eval_name)
  needed = [train_path] + ([] if config.no_eval else [eval_path])
  missing = [p for p in needed if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"missing {', '.join(missing)}. {WHERE_TO_GET[spec.name]} To train on a stand-in of the "
        f'same format, run: python -m dlrm_jax.datagen {spec.name} --out_dir {directory} '
        '--train_rows 1000000 --eval_rows 200000 --seed 1, or leave data_location empty to use '
        'the embedded planted data.')
  return DataFiles(train_path, eval_path, input_pipeline.count_rows(train_path), oracle)
