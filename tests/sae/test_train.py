"""The train stage end to end on synthetic caches written with the real shard writer.

Configs are built as dataclasses (no Hydra); W&B is off. Torch runs single-threaded here: the
problems are tiny, and one thread keeps CPU results exact and timings steady on a busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_vision.activations.shards import METADATA, CacheError, split_shards, write_cache
from sae_vision.core import paths
from sae_vision.core.config import Config, SAEConfig, TrainConfig
from sae_vision.sae import loop, train
from sae_vision.sae.architectures import make_sae
from sae_vision.sae.checkpoint import RunLocked, latest_checkpoint, load_sae, run_lock
from sae_vision.sae.loader import MemoryBatches
from sae_vision.sae.runs import CKPT_FILES

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ARCHS = ("relu_l1", "topk", "batchtopk", "jumprelu")
PLANTED_LAYER, PLANTED_DIM = "conv2d0", 64  # a real 64-channel layer name, synthetic contents
SMALL_LAYER, SMALL_DIM = "mixed3a_5x5_bottleneck", 16
RECOVERY_THRESHOLD = 0.95  # mean max cosine; a random 256-atom dictionary in 64-d scores ~0.45


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Single-threaded torch (conftest's one_thread) for exact, steady CPU numbers."""
    yield


def planted_dictionary(n: int, d: int = PLANTED_DIM, n_true: int = 128, p_active: float = 4 / 128,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharkey et al. (2022)-style data: sparse positive mixes of known unit directions."""
    # Offset from the training seeds: torch.manual_seed(s) and Generator(s) draw the same
    # numbers, and an SAE initialised from the truth's own stream would "recover" it for free.
    g = torch.Generator().manual_seed(10_000 + seed)
    truth_TD = F.normalize(torch.randn(n_true, d, generator=g), dim=1)
    active_NT = torch.rand(n, n_true, generator=g) < p_active
    magnitude_NT = 0.5 + torch.rand(n, n_true, generator=g)
    return (active_NT * magnitude_NT) @ truth_TD, truth_TD


def write_synthetic_cache(cache_dir: Path, acts_ND: torch.Tensor, layer: str,
                          chunk: int = 2000, chunks_per_shard: int = 2) -> dict:
    """A real cache (tars + metadata) holding acts_ND; 16 positions per fake image."""
    chunks = []
    for i in range(0, len(acts_ND), chunk):
        a = acts_ND[i:i + chunk]
        idx = np.arange(i, i + len(a))
        pos = np.stack([idx // 16, idx % 16 // 4, idx % 4], 1).astype(np.int32)
        chunks.append((a, pos, {int(j): f"synthetic:{j}" for j in np.unique(idx // 16)}))
    meta = {"layer": layer, "dim": acts_ND.shape[1], "dtype": "float32", "key": cache_dir.name}
    return write_cache(cache_dir, chunks, meta, chunks_per_shard=chunks_per_shard)


def mean_max_cosine(truth_TD: torch.Tensor, dec_FD: torch.Tensor) -> float:
    """For each true direction the best-matching decoder row's cosine, averaged."""
    return float((truth_TD @ F.normalize(dec_FD.detach().float(), dim=1).T).max(1).values.mean())


def make_cfg(root: Path, cache_dir: Path, arch: str = "topk", layer: str = PLANTED_LAYER,
             dim: int = PLANTED_DIM, **train_kw) -> Config:
    """A small CPU training config over an explicit cache folder."""
    cfg = Config()
    cfg.paths.root = str(root)
    cfg.cache.dir = str(cache_dir)
    cfg.layer.name, cfg.layer.dim = layer, dim
    cfg.stage.name = "train"
    cfg.logger.mode = "disabled"
    # Short-run settings: JumpReLU's threshold starts near the planted codes' scale (~2-6 after
    # input scaling), since from 0.001 it would need thousands of steps to get there.
    cfg.sae = SAEConfig(arch=arch, n_features=4 * dim, k=4, aux_k=32,
                        l1_coeff={"relu_l1": 3.0, "jumprelu": 2.0}.get(arch, 1.0),
                        jumprelu_threshold=1.0, jumprelu_bandwidth=0.5)
    cfg.train = TrainConfig(n_steps=300, batch_size=256, lr=1e-2, warmup_steps=20,
                            ckpt_every=150, log_every=50, dead_window=20_000, holdout_frac=0.2,
                            device="cpu")
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(cache_dir, truth_TD): 24k planted vectors in 6 shards (one held out at 0.2)."""
    acts_ND, truth_TD = planted_dictionary(24_000)
    cache_dir = tmp_path_factory.mktemp("planted") / "cache"
    write_synthetic_cache(cache_dir, acts_ND, PLANTED_LAYER)
    return cache_dir, truth_TD


# --------------------------------------------------------------------------------------------
# Recovery through the real stage


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_recovers_a_planted_dictionary_through_the_stage(arch, planted, tmp_path):
    cache_dir, truth_TD = planted
    cfg = make_cfg(tmp_path, cache_dir, arch)
    result = train.run(cfg)
    sae, meta = load_sae(result.run_dir)
    score = mean_max_cosine(truth_TD, sae.W_dec)
    assert score > RECOVERY_THRESHOLD, f"{arch}: mean max cosine {score:.3f}"
    assert result.metrics["fvu"] < 0.3
    assert result.metrics["n_steps"] == cfg.train.n_steps
    # The checkpoint carries what evaluate needs, without Hydra.
    assert meta["holdout_shards"] == split_shards(json.loads((cache_dir / METADATA).read_text()),
                                                  0.2)[1]
    assert meta["step"] == cfg.train.n_steps and meta["finished"]
    assert meta["config"]["sae"]["arch"] == arch
    assert float(sae.input_scale) == pytest.approx(meta["input_scale"])


@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_sae_scores_far_below_the_recovery_threshold(arch, planted):
    _, truth_TD = planted
    cfg = make_cfg(Path("unused"), Path("unused"), arch)
    torch.manual_seed(cfg.train.seed)  # exactly the initialisation the stage trains from
    sae = make_sae(cfg.sae, PLANTED_DIM)
    assert mean_max_cosine(truth_TD, sae.W_dec) < 0.6


def test_finished_run_is_returned_without_training_again(planted, tmp_path, caplog):
    cache_dir, _ = planted
    cfg = make_cfg(tmp_path, cache_dir, "topk", n_steps=20, ckpt_every=10, log_every=10)
    first = train.run(cfg)
    log_before = (first.run_dir / "train_log.jsonl").read_text()
    caplog.clear()
    caplog.set_level("INFO", logger="sae_vision")
    t0 = time.perf_counter()
    again = train.run(cfg)
    assert time.perf_counter() - t0 < 2.0
    assert again.metrics == first.metrics and again.run_dir == first.run_dir
    assert (again.run_dir / "train_log.jsonl").read_text() == log_before
    out = caplog.text
    assert "reusing finished run" in out and str(first.run_dir / "sae.safetensors") in out
    # Only the final checkpoint is kept, committed as one folder and mirrored at the top level.
    assert [p.name for p in (first.run_dir / "checkpoints").iterdir()] == ["step-0000020"]
    for name in CKPT_FILES:
        assert (first.run_dir / name).read_bytes() == \
            (first.run_dir / "checkpoints" / "step-0000020" / name).read_bytes()


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_rerun_restores_a_missing_or_damaged_final_file_from_the_checkpoint(damage, planted,
                                                                            tmp_path, caplog):
    cache_dir, _ = planted
    cfg = make_cfg(tmp_path, cache_dir, "topk", n_steps=20, ckpt_every=10, log_every=10)
    first = train.run(cfg)
    weights = first.run_dir / "sae.safetensors"
    clean = weights.read_bytes()
    if damage == "delete":
        weights.unlink()
    else:
        blob = bytearray(clean)
        blob[-3] ^= 0x01  # inside the tensor data: the file still parses
        weights.write_bytes(bytes(blob))
    caplog.clear()
    caplog.set_level("INFO", logger="sae_vision")
    again = train.run(cfg)
    assert weights.read_bytes() == clean
    assert again.metrics == first.metrics
    assert "restored the run folder's files from the checkpoint" in caplog.text
    assert str(first.run_dir / "checkpoints" / "step-0000020") in caplog.text
    assert ("missing sae.safetensors" if damage == "delete" else "damaged") in caplog.text
    load_sae(first.run_dir)


def test_sweep_points_get_distinct_run_folders(planted, tmp_path):
    cache_dir, _ = planted
    names = set()
    for l1 in (1.0, 2.0):
        for n_feat in (128, 256):
            cfg = make_cfg(tmp_path, cache_dir, "relu_l1")
            cfg.sae.l1_coeff, cfg.sae.n_features = l1, n_feat
            names.add(paths.run_name(cfg, PLANTED_DIM))
    assert len(names) == 4


# --------------------------------------------------------------------------------------------
# The loop's bookkeeping


def test_loop_logs_every_term_l0_fvu_dead_fraction_density_and_throughput(planted):
    cache_dir, _ = planted
    cfg = make_cfg(Path("unused"), cache_dir, "topk", n_steps=20, log_every=5, dead_window=512)
    torch.manual_seed(0)
    sae = make_sae(cfg.sae, PLANTED_DIM)
    x_ND, _ = planted_dictionary(4096, seed=1)
    logged: list[tuple[int, dict]] = []
    metrics = loop.train_loop(sae, MemoryBatches(x_ND, 256, seed=0), cfg.train, cfg.sae,
                               lambda m, s: logged.append((s, m)), None, None,
                               optimizer=loop.make_optimizer(sae, cfg.train.lr))
    assert [s for s, _ in logged] == [5, 10, 15, 20]
    for _, m in logged:
        for key in ("loss", "mse", "auxk", "l0", "fvu", "dead_frac", "samples_per_s", "lr"):
            assert np.isfinite(m[key]), key
        assert m["l0"] == pytest.approx(4.0, abs=0.5)  # k=4, a few codes may be exactly 0
        assert 0.0 < m["fvu"] < 1.5 and m["samples_per_s"] > 0
        assert isinstance(m["density_log10"], np.ndarray)
        assert m["density_log10"].shape == (sae.n_features,)
    assert logged[-1][1]["fvu"] < logged[0][1]["fvu"]
    assert metrics["final_loss"] == pytest.approx(logged[-1][1]["loss"])


def test_feature_that_never_fires_counts_as_dead_only_after_the_window(planted):
    cfg = make_cfg(Path("unused"), Path("unused"), "relu_l1", n_steps=12, log_every=1,
                   dead_window=256 * 6)
    cfg.sae.n_features = 8
    torch.manual_seed(0)
    sae = make_sae(cfg.sae, PLANTED_DIM)
    with torch.no_grad():
        sae.b_enc[0] = -1e4  # feature 0 can never fire (and so never gets a gradient)
    x_ND, _ = planted_dictionary(4096, seed=2)
    logged = []
    loop.train_loop(sae, MemoryBatches(x_ND, 256, seed=0), cfg.train, cfg.sae,
                     lambda m, s: logged.append(m), None, None,
                     optimizer=loop.make_optimizer(sae, cfg.train.lr))
    dead = [m["dead_frac"] for m in logged]
    assert dead[:5] == [0.0] * 5  # 5 x 256 vectors < the 1536-vector window
    assert dead[5:] == [1 / 8] * 7
    assert logged[-1]["density_log10"][0] == pytest.approx(-10.0)


# --------------------------------------------------------------------------------------------
# Failure modes


def test_missing_cache_error_gives_the_cache_command(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "nowhere", "topk")
    cfg.cache.dir = None
    with pytest.raises(CacheError) as err:
        train.run(cfg)
    msg = str(err.value)
    assert "python run.py stage=cache" in msg and f"layer={PLANTED_LAYER}" in msg
    assert f"paths.root={tmp_path}" in msg


def _nan_cache(tmp_path: Path, nan_step: int, batch: int, seed: int) -> tuple[Path, torch.Tensor]:
    """A 16-d cache with one NaN placed in the first row of training batch `nan_step`."""
    acts_ND, _ = planted_dictionary(2000, d=SMALL_DIM, n_true=32, p_active=0.1, seed=5)
    n_train = 1500  # 4 shards of 500, the last held out at holdout_frac=0.25
    row = int(MemoryBatches(torch.zeros(n_train, 1), batch, seed).indices(nan_step)[0])
    bad = acts_ND.clone()
    bad[row, 3] = float("nan")
    cache_dir = tmp_path / "nan-cache"
    write_synthetic_cache(cache_dir, bad, SMALL_LAYER, chunk=500, chunks_per_shard=1)
    return cache_dir, acts_ND


def test_cache_with_nonfinite_statistics_is_refused_before_training(tmp_path):
    cache_dir, _ = _nan_cache(tmp_path, 0, 64, 0)
    cfg = make_cfg(tmp_path, cache_dir, "topk", SMALL_LAYER, SMALL_DIM)
    with pytest.raises(CacheError, match="non-finite"):
        train.run(cfg)


def test_nan_in_activations_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cache_dir, clean_ND = _nan_cache(tmp_path, nan_step=5, batch=64, seed=0)
    # Statistics as a clean cache would have them, so the NaN is met only inside training.
    meta = json.loads((cache_dir / METADATA).read_text())
    meta["mean"] = clean_ND.mean(0).tolist()
    meta["mean_norm"] = float(clean_ND.norm(dim=1).mean())
    (cache_dir / METADATA).write_text(json.dumps(meta))
    cfg = make_cfg(tmp_path, cache_dir, "topk", SMALL_LAYER, SMALL_DIM, n_steps=20,
                   batch_size=64, ckpt_every=2, log_every=2, holdout_frac=0.25, seed=0)
    with pytest.raises(loop.TrainingDiverged) as err:
        train.run(cfg)
    msg = str(err.value)
    assert "step 6 of 20" in msg  # 0-based batch 5 is the 6th step
    assert "1 non-finite value(s)" in msg and "rebuild it with stage=cache" in msg
    assert "step-0000004" in msg and "intact" in msg
    run_dir = paths.sae_root(cfg) / paths.run_name(cfg, SMALL_DIM)
    assert not (run_dir / "train_metrics.json").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000004"]
    sae, meta = load_sae(run_dir)
    assert meta["step"] == 4 and not meta["finished"]
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())


def test_second_live_writer_of_a_run_folder_is_refused(planted, tmp_path):
    cache_dir, _ = planted
    cfg = make_cfg(tmp_path, cache_dir, "topk", n_steps=4, ckpt_every=2, log_every=2)
    run_dir = paths.sae_root(cfg) / paths.run_name(cfg, PLANTED_DIM)
    with run_lock(run_dir):
        with pytest.raises(RunLocked, match="another live run"):
            train.run(cfg)
    assert train.run(cfg).metrics["n_steps"] == 4  # the lock is gone with its holder


# --------------------------------------------------------------------------------------------
# Resume after SIGKILL, and DDP: real processes


RUN_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from omegaconf import OmegaConf
    from sae_vision.sae import train
    from sae_vision.core.config import Config
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config),
                                              json.loads(open(sys.argv[1]).read())))
    res = train.run(cfg)
    print("RESULT " + json.dumps({"final_loss": res.metrics["final_loss"]}))
""")


def _script(tmp_path: Path, cfg: Config) -> tuple[Path, Path]:
    script, cfg_path = tmp_path / "run_train.py", tmp_path / "cfg.json"
    script.write_text(RUN_SCRIPT)
    cfg_path.write_text(json.dumps(asdict(cfg)))
    return script, cfg_path


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_final_loss(planted, tmp_path,
                                                                               caplog):
    cache_dir, _ = planted
    kw = dict(n_steps=200, ckpt_every=10, log_every=25, dead_window=2048)  # AuxK active
    reference = train.run(make_cfg(tmp_path / "reference", cache_dir, "topk", **kw))

    cfg = make_cfg(tmp_path / "killed", cache_dir, "topk", **kw)
    run_dir = paths.sae_root(cfg) / paths.run_name(cfg, PLANTED_DIM)
    script, cfg_path = _script(tmp_path, cfg)
    proc = subprocess.Popen([PYTHON, str(script), str(cfg_path)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(run_dir) is None:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "train_metrics.json").exists(), "the run finished before the kill"
    killed_at = int(latest_checkpoint(run_dir).name.split("-")[1])
    assert 10 <= killed_at < 200

    caplog.set_level("INFO", logger="sae_vision")
    resumed = train.run(cfg)
    assert f"resuming {run_dir} from step {killed_at}" in caplog.text
    assert resumed.metrics["final_loss"] == pytest.approx(reference.metrics["final_loss"],
                                                          rel=1e-6)
    a, _ = load_sae(reference.run_dir)
    b, _ = load_sae(resumed.run_dir)
    for name, t in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], t, rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(25, 201, 25))  # no duplicated log lines from the killed session


# In `make test` again: torchrun starts two more interpreters that each import torch (about a
# minute on the loaded 2-core machine). Its old teardown abort ("terminate called without an
# active exception" on rank 1) came from the DDP wrapper's reference cycle keeping the gloo group
# alive until a later GC or exit; train.run now collects it before the barrier and
# destroy_process_group.
def test_two_process_gloo_ddp_run_matches_one_process_and_saves_once(planted, tmp_path):
    cache_dir, _ = planted
    kw = dict(n_steps=30, ckpt_every=1000, log_every=10, dead_window=1024)
    cfg = make_cfg(tmp_path / "ddp", cache_dir, "topk", **kw)
    cfg.sae.aux_k = 0  # AuxK normalises by each rank's batch variance; the rest is a batch mean
    single_cfg = make_cfg(tmp_path / "single", cache_dir, "topk", **kw)
    single_cfg.sae.aux_k = 0
    single = train.run(single_cfg)

    script, cfg_path = _script(tmp_path, cfg)
    torchrun = Path(PYTHON).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script),
                           str(cfg_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("RESULT ") == 2  # both ranks return the result

    run_dir = paths.sae_root(cfg) / paths.run_name(cfg, PLANTED_DIM)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000030"]
    _, meta = load_sae(run_dir)
    assert meta["world_size"] == 2 and meta["finished"]
    ddp = json.loads((run_dir / "train_metrics.json").read_text())
    # Same global batches, averaged gradients, reduced counters: the runs agree.
    assert ddp["final_loss"] == pytest.approx(single.metrics["final_loss"], rel=1e-4)
    for key in ("l0", "fvu", "dead_frac", "mse"):
        assert ddp[key] == pytest.approx(single.metrics[key], rel=1e-4, abs=1e-6), key
    ddp_log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp_log] == [10, 20, 30]  # rank 0 alone writes the log


def test_relu_l1_resampling_revives_a_dead_feature():
    cfg = make_cfg(Path("unused"), Path("unused"), "relu_l1", n_steps=16, log_every=1,
                   dead_window=256 * 4)
    cfg.sae.n_features, cfg.sae.resample_dead = 8, True
    torch.manual_seed(0)
    sae = make_sae(cfg.sae, PLANTED_DIM)
    with torch.no_grad():
        sae.b_enc[0] = -1e4  # dead until resampled
    x_ND, _ = planted_dictionary(4096, seed=3)
    logged = []
    metrics = loop.train_loop(sae, MemoryBatches(x_ND, 256, seed=0), cfg.train, cfg.sae,
                               lambda m, s: logged.append(m), None, None,
                               optimizer=loop.make_optimizer(sae, cfg.train.lr))
    assert metrics["n_resampled"] >= 1
    assert float(sae.b_enc.detach()[0]) > -1.0  # re-initialised (bias 0, then trained)
    assert logged[-1]["dead_frac"] == 0.0 and logged[-1]["density_log10"][0] > -10.0


def test_training_on_a_cache_of_another_network_is_an_error(tmp_path):
    acts_ND, _ = planted_dictionary(4000, d=SMALL_DIM, n_true=32)
    cache_dir = tmp_path / "cache"
    write_synthetic_cache(cache_dir, acts_ND, SMALL_LAYER, chunk=500)
    meta_path = cache_dir / METADATA
    meta = json.loads(meta_path.read_text())
    meta.update(model="googlenet_bvlc", model_name="googlenet_bvlc", weights_sha256="ab" * 32)
    meta_path.write_text(json.dumps(meta))
    cfg = make_cfg(tmp_path, cache_dir, layer=SMALL_LAYER, dim=SMALL_DIM, n_steps=2)
    cfg.model.family = cfg.model.name = "inceptionv1"
    with pytest.raises(CacheError, match=r"holds activations of model=googlenet_bvlc, but this "
                                         r"run is for model=inceptionv1; pass model=googlenet"):
        train.run(cfg)
    assert not (tmp_path / "sae").exists()
    cfg.model.family = cfg.model.name = "googlenet_bvlc"
    other = tmp_path / "other-weights.npz"
    other.write_bytes(b"not the cached network's weights")
    cfg.model.weights_path = str(other)
    with pytest.raises(CacheError, match="built with weights of sha256 ababababab"):
        train.run(cfg)
    cfg.model.weights_path = None
    assert train.run(cfg).metrics["n_steps"] == 2  # the cache's own network trains
