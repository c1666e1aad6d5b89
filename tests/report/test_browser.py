"""The report in a real browser: headless Chromium (Debian's `chromium`, installed when missing)
opens index.html from file://, driven over the Chrome DevTools protocol on a pipe (stdlib only).

It asserts no console errors; the summary table, frontier figure, coverage figure and a feature
card whose dataset-example image really decoded; and that search filters the cards. A screenshot
is saved (path printed) under artifacts/test-screenshots/ or $SAE_VISION_SCREENSHOT_DIR.

The browser's data (sae_vision.report.browser: which units get cards, their records, the data
scripts) is tested at the end, without a browser.
"""

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_vision.core.config import SAEConfig
from sae_vision.report import browser
from sae_vision.report import stage as report
from sae_vision.report.examples import UnitExamples
from sae_vision.sae.architectures import make_sae
from tests.report.test_stage import build_study

SCREENSHOT_DIR = Path(os.environ.get("SAE_VISION_SCREENSHOT_DIR") or
                      Path(__file__).resolve().parents[2] / "artifacts" / "test-screenshots")


def find_chromium() -> str | None:
    """Path of a Chromium binary, if one is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get on first use when it is missing."""
    path = find_chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env,
                       capture_output=True, timeout=1200)
        path = find_chromium()
    if path is None:
        pytest.skip("no chromium and it could not be installed (apt-get install chromium)")
    return path


class DevTools:
    """A minimal Chrome DevTools protocol client over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, binary: str, user_dir: Path, width: int = 1280, height: int = 1600):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        args = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-default-browser-check", "--mute-audio",
                f"--user-data-dir={user_dir}", f"--window-size={width},{height}", "about:blank"]
        user_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = user_dir / "chromium.log"
        # Chromium reads commands on fd 3 and answers on fd 4. A tiny single-threaded Python
        # moves the pipe ends there and execs it (a preexec_fn is unsafe in a process with
        # threads, and dash cannot redirect from fds above 9).
        exec_py = ("import fcntl, os, sys; "
                   "r, w = (fcntl.fcntl(int(a), fcntl.F_DUPFD, 10) for a in sys.argv[1:3]); "
                   "os.dup2(r, 3); os.dup2(w, 4); os.execv(sys.argv[3], sys.argv[3:])")
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", exec_py, str(to_chrome_r), str(from_chrome_w), binary, *args],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=self._stderr)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._id = 0
        self._replies: dict[int, queue.Queue] = {}
        self.events: queue.Queue[dict] = queue.Queue()
        self.log: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = None

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self._from_chrome, 1 << 16)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg and msg["id"] in self._replies:
                    self._replies[msg["id"]].put(msg)
                else:
                    self.log.append(msg)
                    self.events.put(msg)

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        """Send one command (to the attached page once there is one) and wait for its reply."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        self._replies[self._id] = q = queue.Queue()
        try:
            os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            tail = self.stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"chromium exited (code {self.proc.poll()}): {tail}") from None
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply to {method} within {timeout} s") from None
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> None:
        """A fresh page with console, log and page events on, navigated to url (waits for load)."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        """Block until an event named method arrives."""
        end = time.time() + timeout
        while time.time() < end:
            try:
                ev = self.events.get(timeout=max(end - time.time(), 0.01))
            except queue.Empty:
                break
            if ev.get("method") == method:
                return ev
        raise TimeoutError(f"no {method} within {timeout} s")

    def js(self, expression: str):
        """Evaluate JavaScript in the page (promises awaited) and return its JSON value."""
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                        returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page JS failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        """Poll a JS expression until it is truthy; returns its value."""
        end = time.time() + timeout
        while time.time() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for ev in self.log:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                   for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log: {e.get('text')} {e.get('url', '')}")
        return out

    def screenshot(self, path: Path, width: int = 1280) -> Path:
        """Full-page PNG, taken once every image (lazy ones included) has loaded."""
        height = self.js("document.documentElement.scrollHeight")
        # A viewport as tall as the page: lazy images load, and the sticky header sits on top.
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        try:
            self.js("window.scrollTo(0, 0)")
            self.wait_for("Array.from(document.images).every(i => i.complete)", timeout=15)
            data = self.call("Page.captureScreenshot", format="png")["data"]
        finally:
            self.call("Emulation.clearDeviceMetricsOverride")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Ask the browser to quit, then make sure it did."""
        try:
            self.call("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stderr.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory, chromium):
    """The constructed study's report, open in headless Chromium."""
    root = tmp_path_factory.mktemp("browser")
    res = report.run(build_study(root))
    chrome = DevTools(chromium, root / "chrome-profile")
    try:
        chrome.open(Path(res.index_path).resolve().as_uri())
        chrome.wait_for("document.querySelectorAll('#cards .card').length > 0")
        yield chrome
    finally:
        chrome.close()


def test_report_renders_without_console_errors(page):
    assert page.errors() == []


def test_summary_table_and_figures_are_visible(page):
    rows = page.js("document.querySelectorAll('#summary-table tr').length")
    assert rows == 3  # header + two runs
    loaded = page.js("""Array.from(document.querySelectorAll('img.frontier-figure, img.coverage-figure'))
        .map(i => [i.className, i.complete && i.naturalWidth > 0])""")
    kinds = {cls for cls, ok in loaded if ok}
    assert kinds == {"frontier-figure", "coverage-figure"}, loaded


def test_a_feature_card_shows_a_decoded_dataset_example(page):
    page.js("document.querySelector('#cards .card img.example').scrollIntoView()")
    width = page.wait_for("""(() => { const i = document.querySelector('#cards .card img.example');
        return i && i.complete ? i.naturalWidth : 0; })()""")
    assert width > 0
    shot = page.screenshot(SCREENSHOT_DIR / "report.png")
    print(f"screenshot: {shot}")


def test_search_filters_the_cards(page):
    page.js("window.scrollTo(0, 0)")
    before = page.js("document.querySelectorAll('#cards .card').length")
    page.js("""(() => { const s = document.getElementById('search'); s.value = 'curve';
        s.dispatchEvent(new Event('input')); })()""")
    page.wait_for(f"document.querySelectorAll('#cards .card').length < {before}")
    cards = page.js("Array.from(document.querySelectorAll('#cards .card')).map(c => c.dataset.unit)")
    assert cards == ["3", "7"]  # the two neuron curve detectors of the constructed census
    page.js("""(() => { const s = document.getElementById('search'); s.value = '';
        s.dispatchEvent(new Event('input')); })()""")
    page.wait_for(f"document.querySelectorAll('#cards .card').length == {before}")
    # Switching to a run's browser loads its data script on demand (no fetch on file://).
    page.js("""(() => { const s = document.getElementById('browser-select');
        s.value = s.options[1].value; s.dispatchEvent(new Event('change')); })()""")
    page.wait_for("document.getElementById('count').textContent.includes('features')")
    page.js("""(() => { const s = document.getElementById('search'); s.value = 'f5';
        s.dispatchEvent(new Event('input')); })()""")
    page.wait_for("document.querySelectorAll('#cards .card').length == 1")
    assert page.js("document.querySelector('#cards .card').dataset.unit") == "5"
    assert page.js("!!document.querySelector('#cards .card .tuning svg')")  # curve detector
    page.screenshot(SCREENSHOT_DIR / "report-search.png")
    assert page.errors() == []


# --------------------------------------------------------------------------------------------
# The browser's data (sae_vision.report.browser), without a browser


def test_spread_pick_spans_the_whole_ranking():
    order = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert browser.spread_pick(order, 3) == [10, 14, 18]
    assert browser.spread_pick(order, 20) == order
    assert browser.spread_pick(order, 0) == [] and browser.spread_pick(order, -1) == []


def test_pick_units_takes_alive_priority_units_then_spreads_over_density():
    ex = SimpleNamespace(n_active_F=torch.tensor([5, 0, 9, 1, 3]))
    # 1 is dead and 7 out of range; the rest are ranked by density (2, 0, 3) and spread.
    assert browser.pick_units(ex, [1, 7, 4, 4], 3) == [4, 2, 3]
    assert browser.pick_units(ex, [], 10) == [2, 0, 4, 3]
    assert browser.pick_units(ex, [3, 2, 0], 2) == [3, 2]


def test_decoder_atoms_are_each_features_decoded_direction():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", n_features=1030, k=4), 6).eval()  # two 1024 chunks
    atoms = browser.decoder_atoms(sae)
    assert atoms.shape == (1030, 6) and atoms.dtype == torch.float32
    with torch.no_grad():
        zero = sae.decode(torch.zeros(1, 1030))
        for f in (0, 1023, 1024, 1029):
            one = torch.zeros(1, 1030)
            one[0, f] = 1.0
            torch.testing.assert_close(atoms[f], (sae.decode(one) - zero)[0])


def test_write_js_assigns_strict_json_to_a_window_variable(tmp_path):
    path = browser.write_js(tmp_path / "data" / "a.js", "REPORT", None,
                            {"x": np.float32(1.5), "n": float("nan"), "t": (1, 2)})
    assert path.read_text() == 'window.REPORT={"x":1.5,"n":null,"t":[1,2]};\n'
    keyed = browser.write_js(tmp_path / "b.js", "REPORT_DATA", "neurons-mixed3a", [1])
    assert keyed.read_text() == ("window.REPORT_DATA=window.REPORT_DATA||{};"
                                 'window.REPORT_DATA["neurons-mixed3a"]=[1];\n')


def unit_examples() -> UnitExamples:
    """Three units: 0 and 1 share a dataset position, 2 is dead."""
    inf, nan = float("inf"), float("nan")
    return UnitExamples(
        top_val_FK=torch.tensor([[2.0, 1.0], [3.0, -inf], [-inf, -inf]]),
        top_pos_FK3=torch.tensor([[[0, 1, 1], [1, 2, 2]], [[0, 1, 1], [-1, -1, -1]],
                                  [[-1, -1, -1], [-1, -1, -1]]]),
        rand_val_FR=torch.tensor([[0.5], [nan], [nan]]),
        rand_pos_FR3=torch.tensor([[[0, 1, 1]], [[-1, -1, -1]], [[-1, -1, -1]]]),
        n_active_F=torch.tensor([4, 1, 0]), sum_F=torch.tensor([6.0, 3.0, 0.0], dtype=torch.float64),
        n_vectors=10)


def test_unit_records_carry_density_examples_curves_and_chips_with_shared_crops():
    crops = {(0, 1, 1): {"file": "a.png", "clipped": True}, (1, 2, 2): {"error": "gone"}}
    curve = {1: {"cv": 2.0, "cd": True, "o": 90.0, "ps": 7.0, "w": 30.0, "tc": [1.23456, 2.0]}}
    units, table = browser.unit_records(unit_examples(), crops, {0, 1}, curve, {0},
                                        [[[1, 0.5]], [], []], "nb")
    assert table == [["a.png", 1]]  # one file for the position both units show
    assert units[0] == {"i": 0, "d": 0.4, "n_active": 4, "mx": 2.0, "mu": 1.5,
                        "top": [[0, 2.0]], "rnd": [[0, 0.5]], "fv": 1, "nb": [[1, 0.5]]}
    assert units[1] == {"i": 1, "d": 0.1, "n_active": 1, "mx": 3.0, "mu": 3.0, "cv": 2.0, "cd": 1,
                        "o": 90.0, "ps": 7.0, "w": 30.0, "tc": [1.23, 2.0], "top": [[0, 3.0]],
                        "rnd": [], "nb": []}
    assert units[2] == {"i": 2, "d": 0.0, "n_active": 0, "mx": None, "mu": 0.0, "nb": []}


def test_unit_records_without_chips_or_chosen_units_have_no_examples():
    units, table = browser.unit_records(unit_examples(), {}, set(), {}, set(), None, "fs")
    assert table == [] and all("top" not in u and "fs" not in u for u in units)
    assert [u["d"] for u in units] == [0.4, 0.1, 0.0]
