"""The tracker: real W&B offline run folders, nothing when disabled."""

import numpy as np

from sae_vision.core.config import LoggerConfig
from sae_vision.core.tracker import open_tracker


def test_offline_mode_writes_a_real_wandb_run_folder(tmp_path):
    with open_tracker(LoggerConfig(mode="offline"), tmp_path, {"a": 1}, name="t") as tr:
        assert tr.enabled
        tr.log({"loss": 1.5}, step=1)
        tr.log_table("rows", [{"x": 1, "y": 2.0}])
        png = tmp_path / "f.png"
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(png, np.zeros((4, 4)))
        tr.log_image("fig", png)
        tr.summary({"final": 3})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "no W&B transaction log was written"


def test_disabled_mode_writes_nothing(tmp_path):
    with open_tracker(LoggerConfig(mode="disabled"), tmp_path / "x", {"a": 1}) as tr:
        assert not tr.enabled
        tr.log({"loss": 1.0})
    assert not (tmp_path / "x").exists()
