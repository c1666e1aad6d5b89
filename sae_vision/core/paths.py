"""Where every artifact lives, derived from the config alone, and the identity (paths, sizes,
mtimes) of imported array files that names their cache (a stat each, no reading)."""

from __future__ import annotations

from pathlib import Path

from .config import Config, content_hash, n_features_of, to_plain, uses_l1_coeff

ARRAY_SUFFIXES = (".npy", ".safetensors")  # the array files stage=cache data=array imports


def cache_settings(cfg: Config, layer: str) -> dict:
    """The settings that change a layer cache's bytes; their hash names the cache folder."""
    model = to_plain(cfg.model)
    data = to_plain(cfg.data)
    cache = to_plain(cfg.cache)
    if data["name"] == "array":
        # Imported arrays: named by the files (path, size, mtime; one stat each) and the dtype.
        try:
            files = files_identity(data["path"])
        except ValueError:  # the source is gone: its cache can still be named by the path
            files = [{"path": str(Path(data["path"]).expanduser().resolve())}]
        return {"data": {"name": "array", "files": files}, "layer": layer, "dtype": cache["dtype"]}
    data_key = {k: data[k] for k in ("name", "root", "urls", "image_size", "n_images",
                                     "min_scale", "max_scale", "seed")}
    if data.get("subset", "first") != "first":  # the default keeps earlier caches' names
        data_key["subset"] = data["subset"]
    if data.get("views", 1) != 1:  # likewise: a views cache never reuses a plain one
        data_key["views"] = data["views"]
    ident = {k: model[k] for k in ("family", "name", "pretrained", "weights_path")}
    if model.get("plant", {}).get("kind", "none") != "none":  # unplanted keys stay as they were
        ident["plant"] = model["plant"]
    return {
        "model": ident,
        "layer": layer,
        "data": data_key,
        "sampling": {k: cache[k] for k in ("sampling", "n_per_image", "exclude_border")},
        "dtype": cache["dtype"],
        "images_per_shard": cache["images_per_shard"],
        "seed": cfg.seed,
    }


def cache_key(cfg: Config, layer: str) -> str:
    """`<layer>-<hash>`: readable, and unique per content-changing setting."""
    return key_of_settings(cache_settings(cfg, layer))


def key_of_settings(settings: dict) -> str:
    """The cache key that `settings` (as cache_settings returns them) produce."""
    return f"{settings['layer']}-{content_hash(settings)}"


def cache_dir(cfg: Config, layer: str | None = None) -> Path:
    """Folder of the activation cache for `layer` (default: cfg.layer.name)."""
    layer = layer or cfg.layer.name
    if cfg.cache.dir:
        return Path(cfg.cache.dir)
    return Path(cfg.paths.root) / "cache" / cache_key(cfg, layer)


def run_name(cfg: Config, d_in: int) -> str:
    """A readable, settings-derived SAE run name, so sweep points never share a folder."""
    if cfg.train.run_name:
        return cfg.train.run_name
    n_feat = n_features_of(cfg.sae, d_in)
    sparsity = f"l1{cfg.sae.l1_coeff:g}" if uses_l1_coeff(cfg.sae.arch) else f"k{cfg.sae.k}"
    h = content_hash({"sae": to_plain(cfg.sae) | {"run": None}, "train": to_plain(cfg.train),
                      "cache": cache_key(cfg, cfg.layer.name)}, n=8)
    return f"{cfg.layer.name}-{cfg.sae.arch}-f{n_feat}-{sparsity}-s{cfg.train.seed}-{h}"


def sae_root(cfg: Config) -> Path:
    """Folder holding every SAE run."""
    return Path(cfg.paths.root) / "sae"


def report_dir(cfg: Config) -> Path:
    """Folder of the static HTML report."""
    return Path(cfg.paths.root) / "report"


def array_files(path: str | Path) -> list[Path]:
    """The input files: `path` itself, or the .npy/.safetensors files in a folder, sorted."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in ARRAY_SUFFIXES and f.is_file())
        if not files:
            raise ValueError(f"data.path={path} is a folder without .npy or .safetensors files")
        return files
    if not p.is_file():
        raise ValueError(f"data.path={path} does not exist; give a .npy or .safetensors file "
                         "or a folder of them")
    if p.suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"data.path={path} is not a .npy or .safetensors file")
    return [p]


def files_identity(path: str | Path) -> list[dict]:
    """Path, size and mtime of every input file: what names the cache (cheap, no hashing)."""
    out = []
    for f in array_files(path):
        st = f.stat()
        out.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out
