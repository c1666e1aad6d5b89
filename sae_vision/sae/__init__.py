"""Sparse autoencoders: the architectures and their kernels, training batches, the training
loop, checkpoints, torchrun support, planted dictionaries, run folders and the `train` stage.
"""

from . import runs
from .architectures import make_sae
from .checkpoint import RunLocked, load_sae, save_sae
from .loader import MemoryBatches
from .loop import TrainingDiverged, make_optimizer, train_loop
from .planted import PlantedSpec, make_planted, recovery
from .runs import (
    CONFIG_FILE,
    EVAL_DIR,
    SUMMARY_DIR,
    TRAIN_LOG,
    WEIGHTS_FILE,
    RunInfo,
    check_dims,
    check_weights,
    data_config,
    model_config,
    resolve_runs,
    run_info,
)
from .train import run as run_train

__all__ = [
    "CONFIG_FILE",
    "EVAL_DIR",
    "MemoryBatches",
    "PlantedSpec",
    "RunInfo",
    "RunLocked",
    "SUMMARY_DIR",
    "TRAIN_LOG",
    "TrainingDiverged",
    "WEIGHTS_FILE",
    "check_dims",
    "check_weights",
    "data_config",
    "load_sae",
    "make_optimizer",
    "make_planted",
    "make_sae",
    "model_config",
    "recovery",
    "resolve_runs",
    "run_info",
    "run_train",
    "runs",
    "save_sae",
    "train_loop",
]
