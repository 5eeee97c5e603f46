"""Models, datasets, partitioners, local training and evaluation for p2pfl peers.

Everything here works on flat parameter vectors (``p2pfl.model``) and on datasets held
once in memory, with peers identified by index arrays into them.
"""

from p2pfl.learning.datasets import (
    DATASETS,
    Dataset,
    DatasetUnavailable,
    clear_dataset_cache,
    default_data_dir,
    load_dataset,
)
from p2pfl.learning.evaluate import EvalResult, evaluate, per_class_recall, predict
from p2pfl.learning.fetch import FetchError, fetch_dataset, verify_dataset
from p2pfl.learning.models import MODELS, build_model
from p2pfl.learning.partition import PARTITION_SCHEMES, label_distribution, partition
from p2pfl.learning.sampler import BatchSampler, derive_seed, sampler_seed
from p2pfl.learning.trainer import BatchTransform, LocalTrainer

__all__ = [
    "DATASETS",
    "MODELS",
    "PARTITION_SCHEMES",
    "BatchSampler",
    "BatchTransform",
    "Dataset",
    "DatasetUnavailable",
    "EvalResult",
    "FetchError",
    "LocalTrainer",
    "build_model",
    "clear_dataset_cache",
    "default_data_dir",
    "derive_seed",
    "evaluate",
    "fetch_dataset",
    "label_distribution",
    "load_dataset",
    "partition",
    "per_class_recall",
    "predict",
    "sampler_seed",
    "verify_dataset",
]
