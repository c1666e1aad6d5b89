"""Typed config schemas, registered with Hydra's ConfigStore.

This module must stay light: no torch, no numpy. Library code receives these dataclasses (or
OmegaConf objects structured by them), so tests can build them directly without Hydra.
Every `check_*` raises ValueError naming the field and the allowed values.
"""

# long: one documented dataclass per config group (every field with its one-line doc, as STYLE.md
# asks) and the checks that name those fields; splitting schema from checks would put the
# allowed values of a field in a different file from the field.

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

# Lucid/Lucent layer names and their channel counts, shared by both InceptionV1 variants.
# Branch outputs are mixedXX_{1x1,3x3,5x5,pool_reduce}; bottlenecks are inputs to 3x3/5x5.
LAYER_DIMS: dict[str, int] = {
    "conv2d0": 64,
    "conv2d1": 64,
    "conv2d2": 192,
    "mixed3a": 256,
    "mixed3a_1x1": 64,
    "mixed3a_3x3_bottleneck": 96,
    "mixed3a_3x3": 128,
    "mixed3a_5x5_bottleneck": 16,
    "mixed3a_5x5": 32,
    "mixed3a_pool_reduce": 32,
    "mixed3b": 480,
    "mixed3b_1x1": 128,
    "mixed3b_3x3_bottleneck": 128,
    "mixed3b_3x3": 192,
    "mixed3b_5x5_bottleneck": 32,
    "mixed3b_5x5": 96,
    "mixed3b_pool_reduce": 64,
}
# Every conv output also exists before its ReLU (mixed3a/mixed3b are concats, so they have none).
PRE_RELU_LAYERS: dict[str, int] = {
    f"{k}_pre_relu": v for k, v in LAYER_DIMS.items() if k not in ("mixed3a", "mixed3b")
}
ALL_LAYER_DIMS: dict[str, int] = {**LAYER_DIMS, **PRE_RELU_LAYERS}
PAPER_LAYERS = ["conv2d0", "conv2d1", "conv2d2", "mixed3a", "mixed3b"]

MODELS = ("googlenet_bvlc", "inceptionv1", "timm")
DATASETS = ("demo", "imagefolder", "webdataset", "array")
ARRAY_LAYER = "array"  # the layer name of a cache imported from arrays (data=array), any width
SAMPLINGS = ("all", "uniform", "norm_weighted")
SUBSETS = ("first", "stratified")
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ArchTraits:
    """What light code (checks, run names, reports) must know about an SAE arch without torch."""

    uses_k: bool  # k selects the codes (the TopK family); otherwise k is at most an L0 target
    has_sparsity_coeff: bool  # λ = sae.l1_coeff weighs a sparsity term in the loss


# The one table of these facts: sae.py's classes copy them onto themselves (SAE.__init_subclass__).
ARCH_TRAITS: dict[str, ArchTraits] = {
    "relu_l1": ArchTraits(uses_k=False, has_sparsity_coeff=True),
    "topk": ArchTraits(uses_k=True, has_sparsity_coeff=False),
    "batchtopk": ArchTraits(uses_k=True, has_sparsity_coeff=False),
    "jumprelu": ArchTraits(uses_k=False, has_sparsity_coeff=True),
}
ARCHS = tuple(ARCH_TRAITS)


def uses_l1_coeff(arch: str | None) -> bool:
    """True when `arch` is known and has a sparsity coefficient (its knob is l1_coeff, not k)."""
    return arch in ARCH_TRAITS and ARCH_TRAITS[arch].has_sparsity_coeff
STAGES = ("cache", "train", "evaluate", "report")
LOGGER_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
LOADER_MODES = ("auto", "memory", "stream")
PLANTS = ("none", "hidden", "rotate")
HELD_OUT_SAMPLES = ("first", "spread")


@dataclass
class PathsConfig:
    root: str = "artifacts"  # every artifact lives under this folder


@dataclass
class StageConfig:
    name: str = "???"  # which stage run.py dispatches to: cache | train | evaluate | report


@dataclass
class PlantConfig:
    kind: str = "none"  # none | hidden (a detector mixed with partners) | rotate (whole layer)
    layer: str = "mixed3b"  # the rotated layer (a block or conv output of googlenet_bvlc)
    channels: list[int] = field(default_factory=list)  # hidden: [detector, partner, ...]
    angle_deg: float = 45.0  # hidden with one partner: the rotation angle (45: a 50/50 mix)
    seed: int = 0  # the random orthogonal map (rotate, or hidden with 2+ partners)


@dataclass
class ModelConfig:
    family: str = "googlenet_bvlc"  # googlenet_bvlc | inceptionv1 (Lucent, inception5h) | timm
    name: str = "googlenet_bvlc"  # timm model name when family=timm; informational otherwise
    pretrained: bool = True  # False gives random init (plumbing tests only)
    weights_path: str | None = None  # explicit weights file; overrides every other source
    weights_dir: str | None = None  # folder to search; falls back to $SAE_VISION_WEIGHTS_DIR
    allow_download: bool = True  # try the network when no local weights are found
    device: str = "auto"  # auto | cpu | cuda
    plant: PlantConfig = field(default_factory=PlantConfig)  # planted control (README: Controls)


@dataclass
class LayerConfig:
    name: str = "mixed3b"  # Lucid layer name, or a module path for model.family=timm
    dim: int = 480  # channels; `layer=<name>` sets it from LAYER_DIMS (0: unknown, timm/array)


@dataclass
class DataConfig:
    name: str = "demo"  # demo | imagefolder | webdataset
    root: str | None = None  # ImageFolder root (data=imagefolder)
    urls: str | None = None  # webdataset shard spec, local path, brace pattern, pipe: or URL
    path: str | None = None  # data=array: a .npy/.safetensors [N, D] file or a folder of them
    image_size: int = 224  # side of the square crop fed to the model
    n_images: int = 256  # images to cache (demo: number of random crops); <=0 means all
    min_scale: float = 0.08  # random-resized-crop area range (demo crops, imagefolder views)
    max_scale: float = 1.0
    seed: int = 0  # fixes the demo crops and flips, the views' crops and flips, the stratified subset
    subset: str = "first"  # imagefolder's n_images: first (of the sorted tree) | stratified
    views: int = 1  # imagefolder: items per photo (view 0: centre crop; 1..: seeded random crop + flip); n_images counts photos
    num_workers: int = 0  # DataLoader workers for decoding


@dataclass
class CacheConfig:
    sampling: str = "norm_weighted"  # all | uniform | norm_weighted
    n_per_image: int = 16  # positions sampled per image (uniform / norm_weighted)
    exclude_border: bool = False  # drop positions whose receptive field reaches into padding
    dtype: str = "float16"  # float16 | bfloat16 | float32 storage
    images_per_shard: int = 64  # images per tar shard: the unit of resume and of parallelism
    batch_size: int = 32  # images per forward pass
    layers: list[str] | None = None  # several layers in one pass; default [layer.name]
    dir: str | None = None  # explicit cache folder (overrides the content-hash name)
    verify: bool = False  # check every shard's sha256 and rewrite the damaged ones


@dataclass
class SAEConfig:
    arch: str = "topk"  # relu_l1 | topk | batchtopk | jumprelu
    expansion: int = 8  # n_features = expansion * d_in, unless n_features is set
    n_features: int | None = None  # explicit dictionary size
    k: int = 32  # active features per vector: exact (topk), batch mean (batchtopk), target (others)
    l1_coeff: float = 5.0  # sparsity coefficient (relu_l1: lambda; jumprelu: L0 coefficient)
    l1_warmup_frac: float = 0.05  # fraction of training over which lambda ramps up linearly
    l0_control: bool = False  # relu_l1/jumprelu: steer lambda so the mean L0 reaches k (conf/sae/jumprelu.yaml: true)
    aux_k: int | None = None  # dead features in the AuxK loss (topk family); None: D/2; 0: off
    aux_coeff: float = 1 / 32  # weight of the AuxK loss
    jumprelu_threshold: float | None = None  # initial θ (scaled units); None: from the 1st batch
    jumprelu_bandwidth: float | None = None  # STE window (scaled units); None: = initial θ
    resample_dead: bool = False  # relu_l1: re-initialise dead features from high-loss inputs
    normalize_inputs: bool = True  # scale inputs so E||x|| = sqrt(d) using cache metadata
    run: str | None = None  # evaluate/report: a run name, a glob, or a sweep folder


@dataclass
class TrainConfig:
    n_steps: int = 2000  # optimiser steps
    # Measured on a planted dictionary (TopK, 400k samples seen, D=128, F=1024): held-out FVU
    # 0.27-0.34 at batch 4096 (only ~100 steps), 0.15-0.19 at 1024, 0.14-0.18 at 512, with
    # samples/s within noise of each other on a 2-core CPU. 1024 keeps most of the per-sample
    # efficiency of small batches and GPU-sized GEMMs; raise it with the data (and the steps).
    batch_size: int = 1024  # vectors per step
    # Measured on real mixed3b vectors (900 ImageNet photos, 2026-12-01; TopK k=32, batch 2048,
    # 300 steps): train FVU 0.39 at lr 4e-4, 0.12 at 2e-3, 0.037 at 4e-3, 0.036 at 8e-3, 0.05 at
    # 1.6e-2 and 0.16 at 3.2e-2 (F=3840); at F=7680, 250 steps: 0.165 at 2e-3, 0.058 at 4e-3.
    # ReLU-L1 (lambda 5): FVU 0.50 / L0 141 at 4e-4, 0.32 / 48 at 2e-3, 0.32 / 15 at 8e-3. Gao et
    # al.'s 2e-4 / sqrt(F / 2^14) (4.1e-4 at F = 3840) is tuned for billions of tokens; for runs
    # of thousands of steps it leaves TopK far from converged. 4e-3 is the measured optimum's
    # lower edge; conf/experiment/paper.yaml keeps 4e-4 for its long ImageNet runs.
    lr: float = 4e-3  # peak Adam learning rate
    warmup_frac: float = 0.05  # linear learning-rate warm-up over this fraction of the steps
    warmup_steps: int | None = None  # an explicit warm-up length in steps (overrides the frac)
    decay_frac: float = 0.2  # final fraction of steps with linear decay to zero
    grad_clip: float = 1.0  # max gradient norm; <=0 disables
    seed: int = 0  # fixes init and data order
    device: str = "auto"  # auto | cpu | cuda
    autocast: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the SAE
    ckpt_every: int = 500  # steps between checkpoints (and at the end)
    log_every: int = 50  # steps between tracker logs
    # Gao et al. use 10M tokens; 1M is several epochs of a demo cache and ~500 steps at the
    # default batch, so AuxK starts working within a short run.
    dead_window: int = 1_000_000  # a feature is dead if unused over this many vectors
    holdout_frac: float = 0.1  # fraction of shards held out for evaluation
    loader: str = "auto"  # auto | memory | stream
    memory_limit_gb: float = 4.0  # auto loads the cache into memory below this size
    shuffle_buffer: int = 262_144  # vectors in the streaming shuffle buffer
    run_name: str | None = None  # default: derived from the settings (never shared in a sweep)


@dataclass
class CurvesConfig:
    orientation_step: float = 5.0  # degrees between stimulus orientations (0-360)
    radii: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0, 32.0, 64.0, 1000.0])
    arc_length_deg: float = 120.0  # angular extent of each arc, degrees
    line_width: float = 2.5  # stroke width in pixels
    fg: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # stroke colour RGB 0..1
    bg: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # background RGB 0..1
    min_peak_sigma: float = 5.0  # peak response in units of the unit's dataset std
    min_curve_line_ratio: float = 1.5  # best curve / best straight line
    max_circular_variance: float = 0.6  # orientation tuning width bound
    max_secondary_peak_ratio: float = 0.5  # unimodality: best response >90° from the peak / peak
    n_null_seeds: int = 6  # seeds per null model
    max_fdr: float = 0.1  # thresholds are tightened until null/real <= this
    orientation_tolerance: float = 30.0  # degrees; invariance checks
    jitter_px: int = 2  # position jitter for invariance
    max_arc_px: float = 48.0  # arcs are cut to this length (px) so large radii stay inside the RF
    line_radius: float = 500.0  # radii at or above this count as straight lines, not curves
    canvas_size: int = 0  # stimulus canvas side; 0 = smallest holding the centre unit's RF (exact)
    invariance_step: float = 10.0  # orientation step of invariance/discrimination sweeps (degrees)
    invariance_radii: list[float] = field(default_factory=lambda: [8.0, 16.0, 32.0, 64.0])  # radii of invariance sweeps
    colour_pairs: list[list[float]] = field(default_factory=lambda: [  # fg RGB + bg RGB per colour condition
        [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.7, 1.0, 0.85, 0.2],
        [0.8, 0.1, 0.1, 0.1, 0.6, 0.1], [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]])
    arc_conditions: list[list[float]] = field(default_factory=lambda: [  # [arc_length_deg, max_arc_px] per arc-length condition
        [120.0, 24.0], [90.0, 48.0], [180.0, 48.0]])
    corner_angles_deg: list[float] = field(default_factory=lambda: [60.0, 90.0, 120.0, 150.0])  # interior angles of corner stimuli
    line_shifts_px: list[float] = field(default_factory=lambda: [-12.0, -8.0, -4.0, 4.0, 8.0, 12.0])  # off-centre line offsets
    min_invariance_corr: float = 0.95  # tuning-curve correlation with the base sweep under every condition
    min_invariance_retention: float = 0.3  # peak under every condition / base peak
    min_corner_ratio: float = 1.0  # best curve / best corner of similar orientation
    min_shifted_line_ratio: float = 1.5  # best curve / best off-centre straight line
    feature_response: str = "pre_acts"  # SAE response scored by the census: pre_acts | encode
    n_random_directions: int = 0  # null (c) directions per seed; 0 = as many as SAE features
    nulls: list[str] = field(default_factory=lambda: ["permuted", "reinit", "spatial"])  # network nulls to run (README: Nulls)
    calibrate: bool = True  # tighten thresholds on the grid below until FDR <= max_fdr
    calib_peak_sigma: list[float] = field(default_factory=lambda: [5.0, 7.5, 10.0, 15.0, 20.0])  # grid
    calib_curve_line_ratio: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0, 5.0])  # grid
    calib_invariance_corr: list[float] = field(default_factory=lambda: [0.9, 0.93, 0.95, 0.97, 0.98])  # grid
    n_reference_images: int = 32  # held-out photos (no data: demo crops) giving every σ: neurons, nulls, features
    batch_size: int = 128  # stimuli per forward pass
    min_gap_deg: float = 30.0  # an orientation gap narrower than this is not a "missing" range
    n_tuning_figures: int = 16  # detected units drawn in the tuning-curve figure
    selectivity_top_frac: float = 0.001  # polysemantic.json's secondary top_mass: code mass on this top fraction of vectors
    polysemantic_min_share: float = 0.05  # a neuron's own features carry at least this share of it
    exemplar_layer: str = "mixed4c"  # polysemantic.json's exemplar score: this later layer embeds each unit's top held-out positions ("" = off)
    exemplar_top: int = 16  # exemplars per unit for that score, at most one per image
    copy_min_share: float = 0.6  # a census feature with >= this share of its decoder or encoder norm² on one channel is a copy
    copy_share_grid: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6, 0.7, 0.8])  # copy thresholds reported side by side
    cover_tolerance_deg: float = 15.0  # a new gap feature is "covered" by a curve-tuned top neuron of its own within this many degrees
    copy_min_rho: float = 0.9  # functional rule: a feature whose battery responses correlate >= this with one channel is a copy (census/novelty.py says why)
    copy_max_dtheta_deg: float = 5.0  # ...and a plain copy when it prefers that channel's orientation within this many degrees, else a shifted copy
    gap_min_separation_deg: float = 15.0  # a gap filler lies >= max(this, the neuron's half width) from both neighbouring curve-tuned neurons
    band_step: float = 0.2  # threshold band: every criterion one relative step looser and stricter than the used thresholds
    band_n_random: int = 64  # threshold band: random combinations of looser/used/stricter criteria, besides the one-at-a-time points
    check_input_block: bool = True  # census of the layer's input block in the real and each null network (seed 0)
    n_new_figures: int = 12  # new features drawn beside their top neurons' tuning


@dataclass
class EvalConfig:
    n_vectors: int = 200_000  # held-out vectors for reconstruction metrics
    dense_threshold: float = 0.1  # a feature active on more than this fraction is dense
    splice: bool = True  # run the model with the layer replaced by the reconstruction
    n_splice_images: int = 64  # held-out images for the splice
    curves: bool = False  # curve-detector census
    curves_layers: list[str] = field(default_factory=list)  # census only for these layers; empty = every layer
    polysemantic: bool = False  # neuron decomposition and selectivity
    compare_run: str | None = None  # second run for cross-seed stability
    batch_size: int = 8192  # vectors per evaluation batch
    dead_min_vectors: int = 100_000  # dead/dense counts span >= this many vectors (train top-up)
    splice_batch_size: int = 16  # images per forward pass in the splice
    polysemantic_vectors: int = 20_000  # held-out vectors for the neuron decomposition (dense codes)
    held_out_sample: str = "first"  # which held-out vectors: first | spread (seeded, over every held-out vector)
    cache: str | None = None  # evaluate on another cache (key or folder): results in eval/on-<key>/


@dataclass
class ReportConfig:
    n_examples: int = 8  # top dataset examples per feature card
    n_random_examples: int = 4  # random activating examples per card
    max_cards: int = 512  # units per run whose cards show dataset examples (all get a card)
    featurevis: bool = False  # render Lucent feature visualisations
    featurevis_steps: int = 128  # optimisation steps
    featurevis_max: int = 32  # features visualised per run
    featurevis_size: int = 128  # side in pixels of the optimised image
    featurevis_batch: int = 16  # units optimised together in one image batch
    max_example_vectors: int = 2_000_000  # cache vectors scanned for examples; <=0: all
    thumb_px: int = 64  # side of the dataset-example thumbnails
    controls: str | None = None  # a `make study-controls` root: its sensitivity joins the findings


@dataclass
class LoggerConfig:
    mode: str = "offline"  # offline | online | disabled (W&B)
    project: str = "sae-vision"  # W&B project
    entity: str | None = None  # W&B entity
    tags: list[str] = field(default_factory=list)  # W&B tags
    group: str | None = None  # W&B group (sweeps)
    progress_every_s: float = 30.0  # seconds between progress lines when output is not a terminal


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    layer: LayerConfig = field(default_factory=LayerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    curves: CurvesConfig = field(default_factory=CurvesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0  # global seed
    experiment: str | None = None  # name of the experiment preset, for the manifest


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (imported lazily: hydra is optional here)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # `layer=<name>` for every Lucid layer, from the one table: layer.dim comes from LAYER_DIMS.
    # (conf/layer/timm.yaml is the only file there: a timm module's width is unknown until run.)
    for name, dim in ALL_LAYER_DIMS.items():
        cs.store(group="layer", name=name, node=LayerConfig(name=name, dim=dim))


# --------------------------------------------------------------------------------------------
# Validation


def _one_of(field_name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field_name}={value!r} is not valid; choose one of {sorted(allowed)}")


def _positive(field_name: str, value, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad:
        raise ValueError(f"{field_name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _check_finite(node: Any, prefix: str = "") -> None:
    """Refuse NaN and Inf anywhere in the config, naming the field (they fail only at step 1)."""
    for f in fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value} is not a finite number; give {key} a finite value "
                             "(or drop the override for its default)")


def check_layer(name: str, family: str = "googlenet_bvlc") -> int:
    """Return the channel count of a Lucid layer name, or raise naming the valid ones."""
    if family == "timm" or name == ARRAY_LAYER:
        return -1  # any width: checked against the model or the cache at run time
    if name not in ALL_LAYER_DIMS:
        raise ValueError(
            f"layer={name!r} is not a known InceptionV1 layer; valid layers are: "
            + ", ".join(ALL_LAYER_DIMS)
        )
    return ALL_LAYER_DIMS[name]


def n_features_of(sae: SAEConfig, d_in: int) -> int:
    """Dictionary size from sae.n_features or sae.expansion * d_in."""
    return int(sae.n_features) if sae.n_features else int(sae.expansion) * int(d_in)


# Top-level config sections each stage reads; an override of any other section does nothing there.
STAGE_SECTIONS: dict[str, set[str]] = {
    "cache": {"model", "layer", "data", "cache", "paths", "logger", "seed", "experiment"},
    "train": {"model", "layer", "data", "cache", "paths", "logger", "seed", "experiment", "sae",
              "train"},
    "evaluate": {"model", "layer", "data", "cache", "paths", "logger", "seed", "experiment",
                 "sae", "train", "eval", "curves"},
    "report": {"model", "layer", "data", "cache", "paths", "logger", "seed", "experiment", "sae",
               "train", "eval", "curves", "report"},
}


def unused_overrides(stage: str, overrides: list[str]) -> list[str]:
    """Command-line overrides of config sections that `stage` never reads."""
    used = STAGE_SECTIONS.get(stage, set()) | {"stage", "hydra", "debug"}
    out = []
    for o in overrides:
        section = o.lstrip("+~").split("=")[0].split(".")[0].split("/")[0]
        if section not in used:
            out.append(o)
    return out


def warmup_steps_of(train: TrainConfig) -> int:
    """Learning-rate warm-up length: train.warmup_steps if set, else warmup_frac of n_steps."""
    if train.warmup_steps is not None:
        return int(train.warmup_steps)
    return int(round(float(train.warmup_frac) * int(train.n_steps)))


def _check_curves(c: CurvesConfig) -> None:
    """The curves settings' ranges, naming the field."""
    _positive("curves.orientation_step", c.orientation_step)
    if not -1.0 <= c.copy_min_rho <= 1.0:
        raise ValueError(f"curves.copy_min_rho={c.copy_min_rho} must lie in [-1, 1]")
    if not 0.0 < c.band_step < 1.0:
        raise ValueError(f"curves.band_step={c.band_step} must lie in (0, 1)")
    for name in ("copy_max_dtheta_deg", "gap_min_separation_deg", "band_n_random"):
        _positive(f"curves.{name}", getattr(c, name), allow_zero=True)
    if c.exemplar_top < 2:
        raise ValueError(f"curves.exemplar_top={c.exemplar_top} must be >= 2 (a coherence "
                         "needs two exemplars)")


def _check_choices(cfg: Config) -> None:
    """Every field that takes one of a fixed set of names."""
    _one_of("stage.name", cfg.stage.name, STAGES)
    _one_of("model.family", cfg.model.family, MODELS)
    _one_of("model.device", cfg.model.device, DEVICES)
    _one_of("train.device", cfg.train.device, DEVICES)
    _one_of("data.name", cfg.data.name, DATASETS)
    _one_of("data.subset", cfg.data.subset, SUBSETS)
    _one_of("cache.sampling", cfg.cache.sampling, SAMPLINGS)
    _one_of("cache.dtype", cfg.cache.dtype, DTYPES)
    _one_of("sae.arch", cfg.sae.arch, ARCHS)
    _one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)
    _one_of("train.loader", cfg.train.loader, LOADER_MODES)
    _one_of("eval.held_out_sample", cfg.eval.held_out_sample, HELD_OUT_SAMPLES)


def _check_data_source(cfg: Config) -> None:
    """Each data source has the setting that says where its data is."""
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise ValueError("data=imagefolder needs data.root=/path/to/imagenet/train (or "
                         "$SAE_VISION_DATA_DIR, or ../shared/data/imagenet-sample beside the "
                         "checkout)")
    if cfg.data.name == "array" and not cfg.data.path:
        raise ValueError("data=array needs data.path=/path/to/acts.npy (a .npy or .safetensors "
                         "file, or a folder of them)")
    if cfg.data.name == "array" and cfg.layer.name != ARRAY_LAYER:
        raise ValueError(f"data=array caches have layer.name={ARRAY_LAYER!r}, not "
                         f"{cfg.layer.name!r}; drop the layer override")
    if cfg.data.name == "webdataset" and not cfg.data.urls:
        raise ValueError("data=webdataset needs data.urls='/path/shard-{000000..000099}.tar'")


def _check_views(cfg: Config) -> None:
    """data.views: a positive int, imagefolder only, and never splitting a photo's views between
    two shards (the train/held-out split is by shard)."""
    views = cfg.data.views
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"data.views={views!r} must be a whole number >= 1 (1: the plain "
                         "centre crop of each photo)")
    if views > 1 and cfg.data.name != "imagefolder":
        raise ValueError(f"data.views={views} needs data=imagefolder (data={cfg.data.name} has "
                         "no views); drop the data.views override")
    per = cfg.cache.images_per_shard
    if views > 1 and per % views:
        raise ValueError(
            f"cache.images_per_shard={per} is not a multiple of data.views={views}: the views "
            "of one photo would straddle two shards, and so the train/held-out split; set "
            f"cache.images_per_shard={max(per // views, 1) * views} (or another multiple of "
            f"{views})")


def check_config(cfg: Config) -> None:
    """Validate every field that a typo or a bad value could break; raise ValueError."""
    _check_finite(cfg)
    _check_choices(cfg)
    check_plant(cfg.model.plant, cfg.model.family)
    layers = list(cfg.cache.layers) if cfg.cache.layers else [cfg.layer.name]
    for name in layers:
        dim = check_layer(name, cfg.model.family)
        if name == cfg.layer.name and dim > 0 and cfg.layer.dim != dim:
            raise ValueError(
                f"layer.dim={cfg.layer.dim} does not match layer {name!r}, which has {dim} "
                f"channels; drop the override or set layer.dim={dim}"
            )
    _positive("data.image_size", cfg.data.image_size)
    _positive("cache.n_per_image", cfg.cache.n_per_image)
    _positive("cache.images_per_shard", cfg.cache.images_per_shard)
    _check_views(cfg)
    _positive("cache.batch_size", cfg.cache.batch_size)
    _positive("sae.expansion", cfg.sae.expansion)
    if cfg.sae.n_features is not None:
        _positive("sae.n_features", cfg.sae.n_features)
    _positive("sae.k", cfg.sae.k)
    _positive("sae.l1_coeff", cfg.sae.l1_coeff, allow_zero=True)
    if cfg.sae.aux_k is not None:
        _positive("sae.aux_k", cfg.sae.aux_k, allow_zero=True)
    for name in ("jumprelu_threshold", "jumprelu_bandwidth"):
        if getattr(cfg.sae, name) is not None:
            _positive(f"sae.{name}", getattr(cfg.sae, name))
    _positive("train.n_steps", cfg.train.n_steps)
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.lr", cfg.train.lr)
    if cfg.train.warmup_steps is not None:
        _positive("train.warmup_steps", cfg.train.warmup_steps, allow_zero=True)
    if not 0.0 <= cfg.train.warmup_frac < 1.0:
        raise ValueError(f"train.warmup_frac={cfg.train.warmup_frac} must lie in [0, 1)")
    _positive("train.ckpt_every", cfg.train.ckpt_every)
    _positive("train.log_every", cfg.train.log_every)
    _positive("train.dead_window", cfg.train.dead_window)
    _positive("logger.progress_every_s", cfg.logger.progress_every_s, allow_zero=True)
    _positive("eval.n_vectors", cfg.eval.n_vectors)
    _positive("eval.batch_size", cfg.eval.batch_size)
    _check_curves(cfg.curves)
    if not 0.0 <= cfg.train.decay_frac <= 1.0:
        raise ValueError(f"train.decay_frac={cfg.train.decay_frac} must lie in [0, 1]")
    if not 0.0 <= cfg.train.holdout_frac < 1.0:
        raise ValueError(f"train.holdout_frac={cfg.train.holdout_frac} must lie in [0, 1)")
    if not 0.0 < cfg.eval.dense_threshold <= 1.0:
        raise ValueError(f"eval.dense_threshold={cfg.eval.dense_threshold} must lie in (0, 1]")
    if not 0.0 < cfg.data.min_scale <= cfg.data.max_scale <= 1.0:
        raise ValueError("data.min_scale and data.max_scale must satisfy 0 < min <= max <= 1")
    d_in = check_layer(cfg.layer.name, cfg.model.family)
    if d_in > 0 and ARCH_TRAITS[cfg.sae.arch].uses_k:
        n_feat = n_features_of(cfg.sae, d_in)
        if cfg.sae.k > n_feat:
            raise ValueError(
                f"sae.k={cfg.sae.k} exceeds the dictionary size {n_feat}; lower sae.k or raise "
                "sae.expansion / sae.n_features"
            )
    _check_data_source(cfg)


def check_plant(plant: PlantConfig, family: str) -> None:
    """Validate model.plant: kind, a Lucid layer of googlenet_bvlc, distinct in-range channels."""
    _one_of("model.plant.kind", plant.kind, PLANTS)
    if plant.kind == "none":
        return
    if family != "googlenet_bvlc":
        raise ValueError(f"model.plant needs model.family=googlenet_bvlc, not {family!r}; drop "
                         "the model.plant overrides")
    dim = check_layer(plant.layer)
    if plant.kind == "hidden":
        ch = list(plant.channels)
        if len(ch) < 2 or len(set(ch)) != len(ch) or not all(0 <= c < dim for c in ch):
            raise ValueError(f"model.plant.channels={ch} must list 2+ distinct channels of "
                             f"{plant.layer} (0..{dim - 1}): the detector first, then partners")


def to_plain(cfg: Any) -> dict:
    """Config (dataclass or OmegaConf) as a plain dict."""
    if is_dataclass(cfg):
        return asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def content_hash(obj: Any, n: int = 12) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
