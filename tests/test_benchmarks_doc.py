"""BENCHMARKS.md quotes only the kept run (benchmarks/results/): every figure in it is a value of
the kept results file, and its generated blocks are exactly what the kept file renders to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import doc  # noqa: E402


@pytest.fixture(scope="module")
def kept() -> dict:
    assert doc.KEPT.is_file(), ("no kept run: `make bench` then `python -m benchmarks.run "
                                "--table --keep` writes benchmarks/results/results.json")
    return doc.load_kept()


def test_every_figure_in_benchmarks_md_is_a_value_of_the_kept_run(kept):
    text = doc.DOC.read_text()
    assert len(doc.figures(text)) > 50  # the tables are there and were read
    bad = doc.unbacked(text, kept)
    assert not bad, (f"figures in BENCHMARKS.md that the kept run did not produce: {bad}; "
                     "take them out of the prose, or rerun and `--table --keep`")


def test_generated_blocks_are_the_kept_run_rendered(kept):
    text = doc.DOC.read_text()
    for name in ("cpu", "scaling-cpu", "misses-cpu", "gpu-check"):
        assert f"<!-- table:{name} -->" in text
    assert doc.stale_blocks(text, kept) == [], "rerun `python -m benchmarks.run --table --keep`"


def test_an_invented_figure_is_reported(kept):
    text = doc.DOC.read_text()
    invented = ("Ours streams 12,345,679 vectors/s, 97.31% of the peer's, at lr 7e-9 "
                "(measured 1999-01-02).\n")
    bad = doc.unbacked(text + invented, kept)
    n = len(text.splitlines()) + 1
    assert bad == [f"line {n}: 1999-01-02", f"line {n}: 12,345,679", f"line {n}: 97.31%",
                   f"line {n}: 7e-9"]
    # A stale figure inside a generated block is caught by the rendering check too.
    cpu = text.index("<!-- table:cpu -->")
    row = text.index("| 1 |", cpu)
    cell = text.index("| ", text.index("images) |", row) + 2)
    stale = text[:cell] + "| 99,991 " + text[text.index(" |", cell + 2):]
    assert doc.stale_blocks(stale, kept) == ["cpu"]
    assert any(b.endswith("99,991") for b in doc.unbacked(stale, kept))


def test_figures_are_read_at_their_printed_precision():
    text = ("13,384 vectors at 0.876 and 4e-4, 61% of 2.62×; mixed3b, sha256, bf16, torch "
            "2.14.1, L0\n```\n0.123456 in a fenced block\n```\n")
    got = [(shown, value, half) for _, shown, value, half in doc.figures(text)]
    assert got == [("13,384", 13384.0, 0.5), ("0.876", 0.876, 0.0005),
                   ("4e-4", 4e-4, 0.5e-4), ("61%", 61.0, 0.5), ("2.62", 2.62, 0.005)]
    kept = {"bench": {"ratio": 0.8764, "bytes": 3 * 2**20, "step_s": 0.0125}, "gpu_check": None}
    ok = "0.876, 0.88, 87.6%, 88%, 3 MiB, 12.5 ms, goal 0.9, ours ≤ 1.02 × peer"
    assert doc.unbacked(ok, kept) == []
    assert doc.unbacked("0.877 and 0.86 and 87.7%", kept) == [
        "line 1: 0.877", "line 1: 0.86", "line 1: 87.7%"]


def test_keep_drops_step_lists_and_stays_small(tmp_path, kept):
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"runs": {"cpu": {"train": {"ours": {
        "step_s": [0.1] * 500, "samples_per_s": 5.0}}, "profiles": {"x": "p.txt"}}}}))
    dest = doc.keep(src, tmp_path / "kept" / "results.json")
    assert json.loads(dest.read_text()) == {"runs": {"cpu": {"train": {"ours": {
        "samples_per_s": 5.0}}}}}
    assert doc.KEPT.stat().st_size < 200_000
    assert "\"step_s\":" not in doc.KEPT.read_text()


def test_refresh_doc_rewrites_every_block_from_the_kept_run(tmp_path, kept):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# B\n\n<!-- table:cpu -->\n| old | 1,234 |\n<!-- /table:cpu -->\n\n"
                    "<!-- table:nothing -->\n<!-- /table:nothing -->\n")
    assert doc.stale_blocks(page.read_text(), kept) == ["cpu", "nothing"]
    assert doc.refresh_doc(page, kept) == ["cpu", "nothing"]
    text = page.read_text()
    assert doc.stale_blocks(text, kept) == [] and "1,234" not in text
    assert "No kept results for `nothing`." in text
