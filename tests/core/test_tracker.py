"""The tracker: real W&B offline run folders, nothing when disabled."""

import os

import numpy as np
import pytest

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


@pytest.mark.slow
def test_online_run_whose_server_stalls_after_the_probe_goes_offline_within_the_bound(
        tmp_path, monkeypatch, capsys):
    """The server answers the probe (GET /) but never the run's own requests: init is bounded,
    and the run carries on offline with the sync command printed."""
    import socket
    import threading
    import time

    from sae_vision.core import tracker

    server, held = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def handle(conn):
        if conn.recv(65536).startswith(b"GET / "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            conn.close()
        else:
            held.append(conn)  # never answered

    def accept():
        while True:
            try:
                conn = server.accept()[0]
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    (tmp_path / "netrc").write_text("")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert tracker.reachable(url)  # the probe is answered
    t0 = time.perf_counter()
    with open_tracker(LoggerConfig(mode="online"), tmp_path / "run", {"a": 1}) as tr:
        elapsed = time.perf_counter() - t0
        tr.log({"loss": 1.0}, step=1)
    assert elapsed < tracker.INIT_TIMEOUT_S + 10, f"init took {elapsed:.0f} s"
    (offline,) = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert list(offline.glob("run-*.wandb"))
    err = capsys.readouterr().err
    assert f"W&B at {url} did not start the run within" in err and "logging offline" in err
    assert f"`wandb sync {offline}`" in err
    server.close()
    for conn in held:
        conn.close()
