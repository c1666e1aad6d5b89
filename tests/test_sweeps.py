"""W&B sweep YAMLs and Hydra launcher configs: expanded exactly as an agent would, then run.

A W&B agent builds each run's command from the sweep's `command:` list, replacing ${env}
(nothing here), ${interpreter} (python), ${program} (run.py) and ${args_no_hyphens} (one
`key=value` per parameter). Those `key=value` pairs must be Hydra overrides that compose.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import OmegaConf

from sae_vision.core.config import check_config, register_configs

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
AGENT_TOKENS = ("${env}", "${interpreter}", "${program}")
TRAIN_LOGS = {"loss", "mse", "fvu", "l0", "dead_frac"}  # keys the train stage logs


def expand(sweep: dict) -> list[list[str]]:
    """Every command a W&B grid agent would run for this sweep, as argv lists."""
    params = sweep["parameters"]
    grids = [[p["value"]] if "value" in p else list(p["values"]) for p in params.values()]
    commands = []
    for combo in itertools.product(*grids):
        args = [f"{name}={value}" for name, value in zip(params, combo)]
        argv: list[str] = []
        for token in sweep["command"]:
            if token == "${env}":
                continue
            argv += {"${interpreter}": ["python"], "${program}": [sweep["program"]],
                     "${args_no_hyphens}": args}.get(token, [token])
        commands.append(argv)
    return commands


@pytest.fixture(scope="module")
def hydra_conf():
    """Hydra initialised on the repo's conf/ (as run.py composes it)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        yield
    GlobalHydra.instance().clear()


def test_there_are_sweeps_for_relu_l1_topk_and_the_paper_layers():
    names = {p.stem for p in SWEEPS}
    assert {"mixed3b_relu_l1", "mixed3b_topk", "paper_layers"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_a_grid_over_sparsity_and_size_in_the_agent_command_form(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "run.py" and (REPO / sweep["program"]).is_file()
    assert sweep["method"] == "grid"
    assert sweep["metric"]["name"] in TRAIN_LOGS
    cmd = sweep["command"]
    assert tuple(cmd[:3]) == AGENT_TOKENS and cmd[-1] == "${args_no_hyphens}"
    assert "stage=train" in cmd
    params = sweep["parameters"]
    assert "sae.expansion" in params and ("sae.l1_coeff" in params or "sae.k" in params)
    assert "layer" in params
    assert len(expand(sweep)) > 1


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_expanded_command_is_a_hydra_override_list_that_composes(path, hydra_conf):
    sweep = yaml.safe_load(path.read_text())
    parser = OverridesParser.create()
    for argv in expand(sweep):
        assert argv[:2] == ["python", "run.py"]
        overrides = argv[2:]
        parser.parse_overrides(overrides)  # raises on anything Hydra cannot parse
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        check_config(cfg)
        given = dict(o.split("=", 1) for o in overrides)
        assert cfg.stage.name == "train"
        assert cfg.layer.name == given["layer"]
        if "sae" in given:
            assert cfg.sae.arch == given["sae"]
        for key in ("sae.l1_coeff", "sae.k", "sae.expansion"):
            if key in given:
                assert float(getattr(cfg.sae, key.split(".")[1])) == float(given[key])


@pytest.mark.parametrize("launcher,target", [
    ("local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_compose_to_an_importable_launcher(launcher, target, hydra_conf):
    cfg = compose("config", overrides=["stage=train", f"hydra/launcher={launcher}"],
                  return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    get_class(target)  # the plugin is installed and importable


# --------------------------------------------------------------------------------------------
# For real, in subprocesses (real Hydra, real weights, W&B offline)


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, weights_dir) -> Path:
    """An artifacts root holding the debug=tiny mixed3b cache."""
    root = tmp_path_factory.mktemp("sweep-artifacts")
    _run(["stage=cache", "debug=tiny", f"paths.root={root}", "logger=disabled"])
    return root


@pytest.mark.slow
def test_one_expanded_sweep_command_trains_for_real_in_offline_mode(tiny_root):
    sweep = yaml.safe_load((REPO / "sweeps" / "mixed3b_topk.yaml").read_text())
    argv = expand(sweep)[0]
    assert argv[:2] == ["python", "run.py"]
    _run([*argv[2:], "debug=tiny", f"paths.root={tiny_root}", "logger.mode=offline"])
    k, expansion = sweep["parameters"]["sae.k"]["values"][0], \
        sweep["parameters"]["sae.expansion"]["values"][0]
    runs = list((tiny_root / "sae").glob(f"mixed3b-topk-f{expansion * 480}-k{k}-*"))
    assert len(runs) == 1 and (runs[0] / "train_metrics.json").is_file()
    assert list((tiny_root / "runs" / "train").glob("*/wandb/offline-run-*"))


@pytest.mark.slow
def test_joblib_multirun_trains_each_sweep_point_in_its_own_folder(tiny_root):
    _run(["-m", "hydra/launcher=local", "stage=train", "debug=tiny",
          f"paths.root={tiny_root}", "logger=disabled", "sae.k=4,8", "train.n_steps=10"])
    runs = sorted(p.name for p in (tiny_root / "sae").glob("mixed3b-topk-f960-k[48]-*"))
    assert len(runs) == 2, runs
    for name in runs:
        assert (tiny_root / "sae" / name / "train_metrics.json").is_file()
