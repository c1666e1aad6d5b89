"""Shared by every stage: the typed config, where artifacts live, whole-file I/O, progress,
the W&B tracker, the Hydra callbacks and the one figure style.
"""

from . import io, paths, plots, progress
from .callbacks import file_in_the_way, unknown_override
from .config import (
    ALL_LAYER_DIMS,
    ARCH_TRAITS,
    ARRAY_LAYER,
    MODELS,
    Config,
    CurvesConfig,
    DataConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
    check_config,
    check_layer,
    content_hash,
    n_features_of,
    register_configs,
    to_plain,
    unused_overrides,
    uses_l1_coeff,
    warmup_steps_of,
)
from .io import (
    PendingWrite,
    atomic_write,
    copy_file,
    drop_stale_tmp,
    to_json,
    write_json,
    write_text,
)
from .paths import array_files, files_identity
from .plots import pyplot, save_fig
from .progress import Progress, track
from .tracker import Tracker, disabled, open_tracker

__all__ = [
    "ALL_LAYER_DIMS",
    "ARCH_TRAITS",
    "ARRAY_LAYER",
    "Config",
    "CurvesConfig",
    "DataConfig",
    "MODELS",
    "ModelConfig",
    "PendingWrite",
    "Progress",
    "SAEConfig",
    "Tracker",
    "TrainConfig",
    "array_files",
    "atomic_write",
    "check_config",
    "check_layer",
    "content_hash",
    "copy_file",
    "disabled",
    "drop_stale_tmp",
    "file_in_the_way",
    "files_identity",
    "io",
    "n_features_of",
    "open_tracker",
    "paths",
    "plots",
    "progress",
    "pyplot",
    "register_configs",
    "save_fig",
    "to_json",
    "to_plain",
    "track",
    "unknown_override",
    "unused_overrides",
    "uses_l1_coeff",
    "warmup_steps_of",
    "write_json",
    "write_text",
]
