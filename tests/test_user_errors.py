"""Damaged and hostile input through the real command line: a pickle planted in a shard never
runs, a damaged cache is named and repaired byte for byte, and every mistake a user can make ends
with one `error:` line and exit code 2, not a traceback."""

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.activations.test_shards import _OpenOnUnpickle, plant_member, rehash

REPO = Path(__file__).resolve().parents[1]
# Four shards of six images, so one repair run can meet four kinds of damage at once.
TINY = ["debug=tiny", "logger=disabled", "model.device=cpu", "layer=mixed3a",
        "cache.images_per_shard=6", "cache.batch_size=6"]


def cli(*args, timeout=300, env=None):
    """`python run.py ...` in a subprocess, without HYDRA_FULL_ERROR (a user's shell)."""
    env = {**os.environ, **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_user_error(out, *needles):
    """Exit code 2, exactly one `error:` line containing every needle, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr[-3000:])


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory):
    """paths.root holding one finished tiny cache built by the real stage (4 shards)."""
    root = tmp_path_factory.mktemp("clean")
    out = cli("stage=cache", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.fixture
def root(clean_cache, tmp_path):
    """A private copy of the clean cache to damage."""
    shutil.copytree(clean_cache / "cache", tmp_path / "cache")
    return tmp_path


def cache_dir_of(root: Path) -> Path:
    (d,) = list((root / "cache").glob("mixed3a-*"))
    return d


# --------------------------------------------------------------------------------------------
# 1. A shard cannot run code


def test_planted_pickle_member_never_runs_and_train_names_shard_and_member(root):
    d, marker = cache_dir_of(root), root / "pwned"
    plant_member(d / "shard-000000.tar", "000000-00000.pyd", pickle.dumps(_OpenOnUnpickle(marker)))
    rehash(d, "shard-000000.tar")  # so it is the member check, not the checksum, that stops it
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert not marker.exists(), "stage=train executed a pickle from a shard"
    assert_user_error(out, "shard-000000.tar", "000000-00000.pyd", "cache.verify=true")


# --------------------------------------------------------------------------------------------
# 2. Damaged shards are named with the repair command, and the repair is byte-exact


def damage(d: Path) -> None:
    """Truncate shard 0, delete shard 1, grow shard 2 by an appended member, flip bytes in 3."""
    tar = d / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:6000])
    (d / "shard-000001.tar").unlink()
    plant_member(d / "shard-000002.tar", "000002-00000.txt", b"appended" * 4000)
    tar = d / "shard-000003.tar"
    blob = bytearray(tar.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 8] = bytes(b ^ 0xFF for b in blob[mid:mid + 8])
    tar.write_bytes(bytes(blob))


def test_cache_verify_rewrites_exactly_the_damaged_shards_byte_for_byte(clean_cache, root):
    d, clean = cache_dir_of(root), cache_dir_of(clean_cache)
    damage(d)
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert_user_error(out, "shard-000000.tar is truncated", "cache.verify=true")
    untouched = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    out = cli("stage=cache", "cache.verify=true", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    for i, problem in enumerate(["truncated", "missing", "grown", "corrupt"]):
        assert f"shard-00000{i}.tar is {problem}" in out.stdout, out.stdout
    want = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in d.iterdir()) == want  # no temporaries or locks left behind
    for name in want:
        assert (d / name).read_bytes() == (clean / name).read_bytes(), name
    assert (d / "metadata.json").stat().st_mtime_ns == untouched["metadata.json"]
    # Verifying a sound cache rewrites nothing.
    out = cli("stage=cache", "cache.verify=true", f"paths.root={root}", *TINY)
    assert out.returncode == 0 and "verified 4 shard(s)" in out.stdout, out.stdout
    assert "rewriting" not in out.stdout


def test_a_member_forged_together_with_the_metadata_is_rebuilt_by_the_advised_verify(
        clean_cache, root):
    d, clean = cache_dir_of(root), cache_dir_of(clean_cache)
    plant_member(d / "shard-000001.tar", "000001-00000.txt", b"forged")
    rehash(d, "shard-000001.tar")  # sidecar and metadata.json agree with the forged tar
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert_user_error(out, "shard-000001.tar", "000001-00000.txt", "cache.verify=true")
    # The advised command, then the original one: the pair succeeds.
    out = cli("stage=cache", "cache.verify=true", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shard-000001.tar is holding a member 000001-00000.txt" in out.stdout, out.stdout
    for name in sorted(p.name for p in clean.iterdir()):
        if name != "metadata.json":
            assert (d / name).read_bytes() == (clean / name).read_bytes(), name
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_metadata_whose_settings_do_not_produce_its_key_is_rebuilt_by_verify(clean_cache, root):
    import json

    d, clean = cache_dir_of(root), cache_dir_of(clean_cache)
    meta = json.loads((d / "metadata.json").read_text())
    meta["settings"]["seed"] += 1  # settings of another cache, under this cache's key
    (d / "metadata.json").write_text(json.dumps(meta))
    out = cli("stage=cache", "cache.verify=true", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "do not produce its key" in out.stdout and "verified" not in out.stdout, out.stdout
    for name in sorted(p.name for p in clean.iterdir()):
        if name != "metadata.json":
            assert (d / name).read_bytes() == (clean / name).read_bytes(), name
    assert json.loads((d / "metadata.json").read_text())["settings"] == json.loads(
        (clean / "metadata.json").read_text())["settings"]
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_a_fifo_in_place_of_a_shard_is_named_and_the_advised_verify_rebuilds_it(clean_cache,
                                                                                root):
    d, clean = cache_dir_of(root), cache_dir_of(clean_cache)
    (d / "shard-000002.tar").unlink()
    os.mkfifo(d / "shard-000002.tar")
    out = cli("stage=train", f"paths.root={root}", *TINY, timeout=120)
    assert_user_error(out, "shard-000002.tar is not a regular file", "cache.verify=true")
    out = cli("stage=cache", "cache.verify=true", f"paths.root={root}", *TINY, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (d / "shard-000002.tar").read_bytes() == (clean / "shard-000002.tar").read_bytes()
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# 3. A cache with no vectors is an error


def test_image_folder_where_nothing_is_readable_ends_with_exit_2_and_the_list(tmp_path):
    images = tmp_path / "images" / "class0"
    images.mkdir(parents=True)
    for i in range(5):
        (images / f"broken-{i}.jpg").write_bytes(b"not a jpeg " * (i + 1))
    out = cli("stage=cache", "data=imagefolder", f"data.root={tmp_path / 'images'}",
              "data.num_workers=0", f"paths.root={tmp_path}", *TINY)
    assert_user_error(out, "holds no vectors", "5 image(s) tried, 5 unreadable",
                      "class0/broken-0.jpg", "`skipped` in", "metadata.json")
    # Rerunning does not reuse the empty cache silently.
    out = cli("stage=cache", "data=imagefolder", f"data.root={tmp_path / 'images'}",
              "data.num_workers=0", f"paths.root={tmp_path}", *TINY)
    assert_user_error(out, "holds no vectors")


# --------------------------------------------------------------------------------------------
# 4. Every failure a user can cause: one `error:` line, exit code 2


@pytest.fixture(scope="module")
def trained(clean_cache, tmp_path_factory):
    """paths.root with the clean cache and one finished tiny training run."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(clean_cache / "cache", root / "cache")
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.fixture
def run_root(trained, tmp_path):
    """A private copy of `trained` and its one run folder."""
    shutil.copytree(trained, tmp_path / "r")
    (run_dir,) = [p for p in (tmp_path / "r" / "sae").iterdir() if p.is_dir()]
    return tmp_path / "r", run_dir


def test_corrupt_checkpoint_is_named_with_the_fix(run_root):
    root, run_dir = run_root
    weights = run_dir / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = cli("stage=evaluate", f"paths.root={root}", *TINY)
    assert_user_error(out, str(weights), "damaged", "rerun")


@pytest.mark.slow
def test_evaluate_never_falls_back_to_a_checkpoint_and_the_advised_train_rerun_restores(run_root):
    root, run_dir = run_root
    weights = run_dir / "sae.safetensors"
    weights.unlink()
    out = cli("stage=evaluate", f"paths.root={root}", *TINY)
    (ckpt,) = list((run_dir / "checkpoints").iterdir())
    assert_user_error(out, f"run folder {run_dir} has no sae.safetensors", "stage=train",
                      f"sae.run={ckpt}")
    assert not (ckpt / "eval").exists() and not (run_dir / "eval").exists()
    # The advised command, then the original one: the pair succeeds.
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"restored the run folder's files from the checkpoint {ckpt}" in out.stdout + out.stderr
    assert weights.read_bytes() == (ckpt / "sae.safetensors").read_bytes()
    assert weights.stat().st_ino != (ckpt / "sae.safetensors").stat().st_ino  # a copy
    out = cli("stage=evaluate", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"loading {weights} (step" in out.stdout + out.stderr


@pytest.mark.slow
def test_a_moved_artifacts_folder_evaluates_and_reports_as_before(run_root, tmp_path):
    import json

    root, run_dir = run_root
    out = cli("stage=evaluate", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    before = json.loads((run_dir / "eval" / "metrics.json").read_text())
    moved = tmp_path / "moved"
    root.rename(moved)  # the old absolute paths no longer exist
    out = cli("stage=evaluate", f"paths.root={moved}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    after = json.loads((moved / "sae" / run_dir.name / "eval" / "metrics.json").read_text())
    assert after["reconstruction"] == before["reconstruction"], (after, before)
    assert after["reconstruction"]["fvu"] is not None
    assert after["cache_dir"].startswith(str(moved))
    out = cli("stage=report", f"paths.root={moved}", *TINY, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipping run" not in out.stderr, out.stderr[-3000:]
    assert run_dir.name in (moved / "report" / "index.html").read_text()


@pytest.mark.slow
def test_two_evaluations_of_one_run_at_once_one_refuses_and_the_results_are_intact(run_root):
    import json

    from sae_vision.core import io

    root, run_dir = run_root
    held = io.try_lock(run_dir / "eval.lock")  # a live evaluation of this run
    out = cli("stage=evaluate", f"paths.root={root}", *TINY)
    held.release()
    assert_user_error(out, f"run {run_dir} is being evaluated by another live process",
                      f"pid {os.getpid()}")
    assert not (run_dir / "eval").exists()
    # Two real processes at once: each finishes or refuses with that line; the files are whole.
    args = [sys.executable, "run.py", "stage=evaluate", f"paths.root={root}", *TINY]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in outs), outs
    for rc, err in outs:
        assert rc == 0 or (rc == 2 and "is being evaluated by another live process" in err), err
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["reconstruction"]["fvu"] is not None
    assert not list((run_dir / "eval").glob("*.tmp*")) and not (run_dir / "eval.lock").exists()


def test_run_name_reused_with_other_settings_is_an_error_naming_the_key(run_root):
    root, run_dir = run_root
    out = cli("stage=train", f"paths.root={root}", f"train.run_name={run_dir.name}",
              "train.lr=0.01", *TINY)
    assert_user_error(out, str(run_dir), "different settings", "train.run_name")


@pytest.fixture
def read_only(tmp_path):
    """make(path) -> the same folder, read-only (a read-only bind mount as root, chmod else)."""
    mounts = []

    def make(src: Path) -> Path:
        if os.geteuid() != 0:
            for p in [src, *src.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
            return src
        dst = tmp_path / f"ro-{len(mounts)}"
        dst.mkdir()
        for cmd in (["mount", "--bind", str(src), str(dst)],
                    ["mount", "-o", "remount,ro,bind", str(dst)]):
            if subprocess.run(cmd, capture_output=True).returncode:
                pytest.skip("cannot make a read-only bind mount here")
            mounts.append(dst)
        return dst

    yield make
    for dst in dict.fromkeys(reversed(mounts)):
        subprocess.run(["umount", "-l", str(dst)], capture_output=True)


def test_read_only_artifacts_give_the_real_error_not_a_cleanup_failure(run_root, read_only,
                                                                      tmp_path):
    root, run_dir = run_root
    (run_dir / "eval").mkdir()  # an earlier evaluation's folder: the writes inside it fail
    ro = read_only(root)
    # The run folder elsewhere: evaluate itself meets the read-only artifacts.
    out = cli("stage=evaluate", f"paths.root={ro}", f"hydra.run.dir={tmp_path / 'hy'}", *TINY)
    assert_user_error(out, f"cannot write {ro / 'sae' / run_dir.name / 'eval'}",
                      "point paths.root elsewhere")
    # Everything read-only: Hydra's run folder is refused before Hydra tries to create it.
    out = cli("stage=evaluate", f"paths.root={ro}", *TINY)
    assert_user_error(out, "cannot create the run folder", "not writable")


@pytest.fixture
def full_disk():
    """make(folder): a 16 KiB tmpfs mounted on `folder` (as root), so writes there fill it."""
    mounts = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
                capture_output=True).returncode:
            pytest.skip("cannot mount a small tmpfs here")
        mounts.append(folder)
        return folder

    yield make
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "evaluate"])  # report: tests/report/test_stage.py
def test_disk_full_is_one_error_line_and_loses_nothing(stage, run_root, full_disk):
    root, run_dir = run_root
    if stage == "train":
        shutil.rmtree(root / "sae")
        full = full_disk(root / "sae")
    else:
        full = full_disk(run_dir / "eval")
    weights = None if stage == "train" else (run_dir / "sae.safetensors").read_bytes()
    out = cli(f"stage={stage}", f"paths.root={root}", *TINY, timeout=600)
    assert_user_error(out, "No space left on device", "free space")
    # Nothing half-written is left behind, and the run's weights are as they were.
    assert not [p for p in full.rglob("*") if ".tmp" in p.name], list(full.rglob("*"))
    if weights is not None:
        assert (run_dir / "sae.safetensors").read_bytes() == weights


def test_report_skips_a_broken_run_folder_with_a_warning_and_builds_the_rest(run_root):
    root, run_dir = run_root
    good = run_dir.with_name(run_dir.name + "-copy")
    shutil.copytree(run_dir, good)
    (run_dir / "config.json").write_text("{ not json")
    out = cli("stage=report", f"paths.root={root}", *TINY, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"warning: skipping run {run_dir}" in out.stderr
    assert "config.json" in out.stderr
    assert f"1 run(s): {good.name}" in out.stdout
    assert good.name in (root / "report" / "index.html").read_text()


# --------------------------------------------------------------------------------------------
# 4-5. W&B: missing credentials are an error, no network never hangs, WANDB_MODE is honoured


def wandb_env(tmp_path, **extra):
    """No W&B key anywhere (empty netrc, no WANDB_API_KEY, no WANDB_MODE) unless given."""
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "NETRC": str(netrc), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            **extra}


def cli_env(env, *args, timeout=120):
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_online_logger_without_credentials_is_an_error_with_the_fix(root):
    out = cli_env(wandb_env(root), "stage=cache", f"paths.root={root}", *TINY, "logger=wandb")
    assert_user_error(out, "needs W&B credentials", "wandb login", "WANDB_API_KEY",
                      "logger=wandb_offline")


def test_online_logger_without_network_falls_back_to_offline_within_seconds(root):
    import time

    from sae_vision.core.tracker import base_url, reachable

    if reachable(base_url()):
        pytest.skip("this machine can reach W&B; the no-network path needs it unreachable")
    env = wandb_env(root, WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567")
    t0 = time.perf_counter()
    out = cli_env(env, "stage=cache", f"paths.root={root}", *TINY, "logger=wandb")
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"  # W&B's own init timeout alone is 90 s
    assert "cannot be reached; logging offline instead" in out.stderr
    (offline,) = list((root / "runs" / "cache").glob("*/wandb/offline-run-*"))
    assert f"`wandb sync {offline}`" in out.stderr
    assert list(offline.glob("run-*.wandb"))


def test_wandb_mode_from_the_environment_is_honoured_and_the_conflict_stated(root):
    out = cli_env(wandb_env(root, WANDB_MODE="offline"), "stage=cache", f"paths.root={root}",
                  *TINY)  # TINY says logger=disabled
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WANDB_MODE=offline from the environment overrides logger.mode=disabled" in out.stderr
    assert list((root / "runs" / "cache").glob("*/wandb/offline-run-*/run-*.wandb"))


# --------------------------------------------------------------------------------------------
# 6. Keys that do not exist are refused, with or without +, naming the closest valid key


@pytest.mark.parametrize("arg", ["sae.l1_coef=3", "+sae.l1_coef=3", "++sae.l1_coef=3"])
def test_unknown_key_is_refused_with_or_without_plus_naming_the_closest(arg, tmp_path):
    out = cli("stage=train", arg, f"paths.root={tmp_path}", "logger=disabled", timeout=120)
    assert_user_error(out, "unknown config key 'sae.l1_coef'", "did you mean sae.l1_coeff?")
    assert not (tmp_path / "sae").exists()  # nothing trained


def test_valid_keys_groups_and_hydra_settings_pass_the_key_check():
    from sae_vision.core.callbacks import unknown_override

    ok = ["stage=train", "layer=mixed3a", "sae=relu_l1", "sae.l1_coeff=1,3", "+experiment=demo",
          "hydra/launcher=local", "hydra.run.dir=/tmp/x", "seed=3", "cache.layers=[a,b]", "-m",
          "debug=tiny", "~logger.tags"]
    assert unknown_override(ok, REPO / "conf") is None
    assert "did you mean train.n_steps?" in unknown_override(["train.n_stepz=3"], REPO / "conf")


def test_device_cuda_without_a_gpu_is_one_error_line(tmp_path):
    args = [a for a in TINY if a != "model.device=cpu"]
    out = cli("stage=cache", f"paths.root={tmp_path}", *args, "model.device=cuda",
              env={"CUDA_VISIBLE_DEVICES": ""})
    assert_user_error(out, "model.device=cuda but CUDA is not available", "use model.device=auto")


def test_train_device_cuda_without_a_gpu_is_one_error_line(root):
    out = cli("stage=train", f"paths.root={root}", *TINY, "train.device=cuda", "train.n_steps=2",
              env={"CUDA_VISIBLE_DEVICES": ""})
    assert_user_error(out, "train.device=cuda but CUDA is not available", "use train.device=auto")


# --------------------------------------------------------------------------------------------
# 7. Hydra's own composition errors and non-finite numbers: one `error:` line, exit code 2


@pytest.mark.parametrize("arg, needles", [
    ("train.lr=abc", ["train.lr=abc is not valid", "takes a number", "train.lr=0.004"]),
    ("sae.k=8.5", ["sae.k=8.5 is not valid", "takes an integer"]),
    ("sae=topkk", ["did you mean sae=topk?", "batchtopk, jumprelu, relu_l1, topk"]),
    ("stage=trian", ["did you mean stage=train?", "cache, evaluate, report, train"]),
    ("layer=mixed9z", ["layer=mixed9z is not a choice for layer", "mixed3a, ", "conv2d0, "]),
    ("train.lr=[1", ["cannot compose the config", "override_grammar"]),
    ("train.lr=inf", ["train.lr=inf is not a finite number"]),
    ("sae.l1_coeff=nan", ["sae.l1_coeff=nan is not a finite number"]),
])
def test_hydra_composition_errors_and_non_finite_numbers_are_one_error_line(arg, needles,
                                                                             tmp_path):
    out = cli("stage=train", arg, f"paths.root={tmp_path}", "logger=disabled", timeout=120)
    assert_user_error(out, *needles)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "sae").exists()  # refused at start


def test_views_that_would_straddle_shards_are_one_error_line_before_any_work(tmp_path):
    (tmp_path / "photos").mkdir()
    out = cli("stage=cache", "data=imagefolder", f"data.root={tmp_path / 'photos'}",
              "data.views=8", "cache.images_per_shard=100", f"paths.root={tmp_path}",
              "logger=disabled", timeout=120)
    assert_user_error(out, "cache.images_per_shard=100 is not a multiple of data.views=8",
                      "set cache.images_per_shard=96")
    assert not (tmp_path / "cache").exists()  # refused at start


def test_hydra_full_error_still_gives_hydras_traceback(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "stage=train", "sae=topkk",
                          f"paths.root={tmp_path}", "logger=disabled"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 1 and "MissingConfigException" in out.stderr, out.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# 8. A file where a folder is expected, and a metadata.json that is not an object


def test_paths_root_that_is_a_file_is_one_error_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = cli("stage=cache", f"paths.root={afile}", *TINY, timeout=120)
    assert_user_error(out, f"{afile} is a file where a folder is expected")


@pytest.mark.parametrize("stage, name", [("cache", "cache"), ("train", "sae")])
def test_a_file_named_like_a_stage_folder_is_one_error_line(stage, name, root):
    if (root / name).exists():
        shutil.rmtree(root / name)
    (root / name).write_text("x")
    out = cli(f"stage={stage}", f"paths.root={root}", *TINY, timeout=120)
    assert_user_error(out, f"{root / name} is a file where a folder is expected", "move it away")


@pytest.mark.slow
@pytest.mark.parametrize("content", ["[]", "null"])
def test_metadata_that_is_not_an_object_is_named_and_the_advised_fix_works(content, root):
    meta = cache_dir_of(root) / "metadata.json"
    meta.write_text(content)
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert_user_error(out, f"{meta} holds {content}", "delete it and rerun stage=cache")
    meta.unlink()  # the advised fix, then the original command
    out = cli("stage=cache", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])  # kept open, never read from or written to

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_online_logger_with_a_silent_server_goes_offline_within_the_deadline(root,
                                                                             silent_server):
    import time

    args = ["stage=cache", f"paths.root={root}", *TINY]
    t0 = time.perf_counter()
    out = cli_env(wandb_env(root), *args)  # the run itself (TINY says logger=disabled)
    alone = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    env = wandb_env(root, WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567",
                    WANDB_BASE_URL=silent_server)
    t0 = time.perf_counter()
    out = cli_env(env, *args, "logger=wandb")
    extra = time.perf_counter() - t0 - alone
    assert out.returncode == 0, out.stderr[-3000:]
    assert extra < 20, f"the silent server cost {extra:.0f} s"
    assert f"W&B at {silent_server} cannot be reached; logging offline instead" in out.stderr
    (offline,) = list((root / "runs" / "cache").glob("*/wandb/offline-run-*"))
    assert f"`wandb sync {offline}`" in out.stderr
