"""Config validation: every bad value ends in a ValueError that names the field, never deeper."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_vision.core.config import ALL_LAYER_DIMS, Config, check_config, check_layer, content_hash


def _cfg(**sections):
    cfg = Config()
    cfg.stage.name = "train"
    for path, value in sections.items():
        section, key = path.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def test_default_config_is_valid_and_its_layer_dim_comes_from_the_table():
    cfg = _cfg()
    check_config(cfg)
    assert cfg.layer.dim == ALL_LAYER_DIMS[cfg.layer.name] == 480


def test_unknown_layer_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        check_layer("nope")
    msg = str(e.value)
    assert "nope" in msg and all(name in msg for name in ("conv2d0", "mixed3b", "mixed3a_5x5"))


NUMERIC_FIELDS = {
    "cache__n_per_image": "cache.n_per_image", "cache__images_per_shard": "cache.images_per_shard",
    "cache__batch_size": "cache.batch_size", "sae__expansion": "sae.expansion", "sae__k": "sae.k",
    "train__n_steps": "train.n_steps", "train__batch_size": "train.batch_size",
    "train__lr": "train.lr", "train__ckpt_every": "train.ckpt_every",
    "eval__n_vectors": "eval.n_vectors", "data__image_size": "data.image_size",
}


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(sorted(NUMERIC_FIELDS)), value=st.integers(-10**6, 0))
def test_non_positive_sizes_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=NUMERIC_FIELDS[field].replace(".", r"\.")):
        check_config(_cfg(**{field: value}))


@settings(max_examples=40, deadline=None)
@given(layer=st.sampled_from(["mixed3b", "conv2d0", "mixed3a_5x5"]), extra=st.integers(1, 10**5))
def test_k_larger_than_dictionary_is_refused(layer, extra):
    dim = ALL_LAYER_DIMS[layer]
    cfg = _cfg(layer__name=layer, layer__dim=dim, sae__expansion=1, sae__k=dim + extra)
    with pytest.raises(ValueError, match="sae.k"):
        check_config(cfg)


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=20).filter(lambda s: s not in ALL_LAYER_DIMS))
def test_any_unknown_layer_is_a_value_error(name):
    with pytest.raises(ValueError, match="valid layers"):
        check_config(_cfg(layer__name=name))


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(["cache__sampling", "cache__dtype", "sae__arch", "model__family",
                              "logger__mode", "data__name", "train__device", "stage__name"]),
       value=st.text(max_size=12))
def test_bad_choices_list_the_allowed_values(field, value):
    cfg = _cfg()
    allowed = getattr(getattr(cfg, field.split("__")[0]), field.split("__")[1])
    if value == allowed:
        return
    try:
        check_config(_cfg(**{field: value}))
    except ValueError as e:
        assert "choose one of" in str(e)
    else:
        raise AssertionError(f"{field}={value!r} was accepted")


def test_layer_dim_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"layer.dim=256.*480"):
        check_config(_cfg(layer__dim=256))


def test_content_hash_is_stable_and_sensitive():
    a = dataclasses.asdict(Config())
    b = dataclasses.asdict(Config())
    assert content_hash(a) == content_hash(b)
    b["cache"]["dtype"] = "float32"
    assert content_hash(a) != content_hash(b)


def test_views_are_part_of_the_cache_key_and_one_view_keeps_todays_key():
    from sae_vision.core.paths import cache_key

    cfg = _cfg(data__name="imagefolder", data__root="/photos")
    assert cache_key(cfg, "mixed3b") == "mixed3b-55268bd55916"  # the key before data.views
    keys = {cache_key(_cfg(data__name="imagefolder", data__root="/photos", data__views=v),
                      "mixed3b") for v in (1, 3, 8)}
    assert len(keys) == 3 and "mixed3b-55268bd55916" in keys


@pytest.mark.parametrize("views, per, needles", [
    (3, 100, ["cache.images_per_shard=100 is not a multiple of data.views=3", "straddle",
              "cache.images_per_shard=99"]),
    (0, 64, ["data.views=0 must be a whole number >= 1"]),
    (2.5, 64, ["data.views=2.5 must be a whole number >= 1"]),
])
def test_bad_views_are_refused_naming_the_fix(views, per, needles):
    cfg = _cfg(data__name="imagefolder", data__root="/photos", data__views=views,
               cache__images_per_shard=per)
    with pytest.raises(ValueError) as e:
        check_config(cfg)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_views_need_an_image_folder_and_a_whole_number_of_photos_per_shard():
    with pytest.raises(ValueError, match="data.views=2 needs data=imagefolder"):
        check_config(_cfg(data__views=2))
    check_config(_cfg(data__name="imagefolder", data__root="/p", data__views=8,
                      cache__images_per_shard=800))
