"""Images in, activation vectors out: image sources, the networks and their weights, the
sharded activation cache (the `cache` stage) and the import of your own arrays.
"""

from .cache import run as run_cache
from .devices import (
    canonical_device,
    enable_tf32,
    model_device,
    pick_device,
    same_device,
    stage_device,
)
from .images import DemoImages, iter_webdataset, make_images, resolve_data_root
from .models import load_model, lucid_geometry
from .plant import LayerRotation
from .shards import (
    CacheError,
    iter_chunks,
    load_cache_meta,
    load_vectors,
    sha256_file,
    split_shards,
    stream_vectors,
)

__all__ = [
    "CacheError",
    "DemoImages",
    "LayerRotation",
    "canonical_device",
    "enable_tf32",
    "iter_chunks",
    "iter_webdataset",
    "load_cache_meta",
    "load_model",
    "load_vectors",
    "lucid_geometry",
    "make_images",
    "model_device",
    "pick_device",
    "resolve_data_root",
    "run_cache",
    "same_device",
    "sha256_file",
    "split_shards",
    "stage_device",
    "stream_vectors",
]
