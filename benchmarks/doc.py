"""BENCHMARKS.md quotes only the kept run: keep a results file in git, write the doc's generated
blocks from it, and find every figure in the doc that the kept run did not produce.

- `keep(src)` copies a run's `results.json` (trimmed: no per-step time lists, no profiler paths)
  to `benchmarks/results/results.json`, the run BENCHMARKS.md quotes.
- `refresh_doc(doc, kept)` rewrites every `<!-- table:NAME -->` ... `<!-- /table:NAME -->` block
  of the doc from the kept file (`doc_blocks`).
- `unbacked(text, kept)` lists the figures of a doc that no leaf of the kept file gives (see
  `backed_values` for the few derivation rules).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "BENCHMARKS.md"
KEPT_DIR = REPO / "benchmarks" / "results"
KEPT = KEPT_DIR / "results.json"  # `make bench`'s run, trimmed
KEPT_GPU = KEPT_DIR / "gpu-check.json"  # `make gpu-check`'s results.json, when one was lent
DROP_KEYS = frozenset({"step_s", "profiles"})  # bulky per-step lists; profiler file paths

_BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)",
                    re.S)
_DATE = re.compile(r"(?<![\w.])\d{4}-\d{2}-\d{2}(?: \d{2}:\d{2}(?::\d{2})?)?(?![\w.])")
# A figure: digits with thousands commas and/or decimals, an optional exponent and percent sign;
# not part of a word (mixed3b, sha256, bf16, L0) and not a version or path piece (2.14.1).
_ORDINAL = re.compile(r"^\s*\d+\.\s")
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:e([-+]?\d+))?(%?)(?![\w]|\.\d)")


def trim(obj):
    """A copy of a results tree without the DROP_KEYS entries (the kept file stays small)."""
    if isinstance(obj, dict):
        return {k: trim(v) for k, v in obj.items() if k not in DROP_KEYS}
    if isinstance(obj, list):
        return [trim(v) for v in obj]
    return obj


def keep(src: Path, dest: Path = KEPT) -> Path:
    """Write the trimmed copy of the results file `src` to `dest` (the run the doc quotes)."""
    results = json.loads(Path(src).read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(trim(results), indent=1, sort_keys=True) + "\n")
    return dest


def load_kept(kept: Path = KEPT, kept_gpu: Path = KEPT_GPU) -> dict:
    """The kept results: {"bench": <results.json>, "gpu_check": <gpu-check results or None>}."""
    gpu = json.loads(kept_gpu.read_text()) if kept_gpu.is_file() else None
    return {"bench": json.loads(kept.read_text()), "gpu_check": gpu}


def _machine_line(run: dict) -> str:
    m = run["machine"]
    return (f"Machine: {m.get('gpu') or m['cpu_model']}, {m['cores']} cores, "
            f"{m.get('mem_total_gb', float('nan')):g} GB RAM; Python {m['python']}, torch "
            f"{m['torch']}; overcomplete {m.get('peer') or 'absent'}; commit {m['git_commit']}; "
            f"{m['date']}; sizes: {_sizes_name(run['sizes'])}.")


def _sizes_name(sizes: dict) -> str:
    """Which of benchmarks.run's size sets a run used ("custom" when none, e.g. --expansion)."""
    from dataclasses import asdict

    from benchmarks.run import FULL, GPU, QUICK

    for name, known in (("full", FULL), ("quick", QUICK), ("gpu", GPU)):
        if json.loads(json.dumps(asdict(known))) == sizes:
            return name
    return "custom"


def _misses(run: dict) -> str:
    from benchmarks.run import _goal

    lines = [f"- `{k}` = {g['value']:.3g} (goal {_goal(k)}): {g['what']}."
             for k, g in run["goals"].items() if g["met"] is False]
    return "\n".join(lines) or "Every goal was met."


def doc_blocks(kept: dict) -> dict[str, str]:
    """Each generated block of BENCHMARKS.md, by name, rendered from the kept results."""
    from benchmarks.run import markdown_table, scaling_table

    runs = kept["bench"]["runs"]
    blocks = {}
    for device, run in runs.items():
        blocks[device] = markdown_table(run) + "\n\n" + _machine_line(run)
        blocks[f"misses-{device}"] = _misses(run)
        if "scaling" in run:
            blocks[f"scaling-{device}"] = scaling_table(run)
    if kept["gpu_check"] is not None:
        from benchmarks.gpu_check import markdown

        blocks["gpu-check"] = markdown(kept["gpu_check"])
    return blocks


def refresh_doc(doc: Path = DOC, kept: dict | None = None) -> list[str]:
    """Rewrite the doc's generated blocks from the kept results; returns the names written.
    A block the kept results cannot fill says so instead of keeping stale figures."""
    blocks = doc_blocks(load_kept() if kept is None else kept)
    written = []

    def fill(m: re.Match) -> str:
        written.append(m["name"])
        return m.group(1) + _body(blocks, m["name"]) + m.group(4)

    doc.write_text(_BLOCK.sub(fill, doc.read_text()))
    return written


def stale_blocks(text: str, kept: dict) -> list[str]:
    """Names of the doc's generated blocks that differ from a rendering of the kept results."""
    blocks = doc_blocks(kept)
    return [m["name"] for m in _BLOCK.finditer(text)
            if m["body"] != _body(blocks, m["name"])]


def _body(blocks: dict[str, str], name: str) -> str:
    return blocks.get(name, f"No kept results for `{name}`.") + "\n"


# --------------------------------------------------------------------------------------------
# Figures in the doc against the kept results


def _leaves(obj, numbers: list[float], strings: list[str]) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            _leaves(v, numbers, strings)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _leaves(v, numbers, strings)
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, int | float):
        if math.isfinite(obj):
            numbers.append(float(obj))
    elif isinstance(obj, str):
        strings.append(obj)


def backed_values(kept: dict) -> tuple[list[float], list[str]]:
    """Every value a figure in the doc may quote, and the string leaves (for dates).

    The rules: a numeric leaf of the kept results as it is, x 100 (a percentage), / 2^20 (bytes
    as MiB) and x 1000 (seconds as ms); and every goal of benchmarks.run.GOALS, with its inverse
    (the FVU goals are stored as 1 / 1.02)."""
    from benchmarks.run import GOALS

    numbers: list[float] = []
    strings: list[str] = []
    _leaves(kept, numbers, strings)
    derived = [y for x in numbers for y in (x * 100, x / 2**20, x * 1e3)]
    goals = [g for g, _, _ in GOALS.values() if math.isfinite(g)]
    return numbers + derived + goals + [1 / g for g in goals if g], strings


def _prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the doc outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def figures(text: str) -> list[tuple[int, str, float, float]]:
    """Every figure outside fenced code: (line, as printed, value, half its last printed unit).
    Dates (with a time of day, if any) come back with value nan."""
    found = []
    for lineno, line in _prose(text):
        for m in _DATE.finditer(line):
            found.append((lineno, m.group(0), math.nan, 0.0))
        line = _DATE.sub(" ", line)
        line = _ORDINAL.sub(" ", line)  # "6. caching ...": a list's ordinal, not a figure
        for m in _NUMBER.finditer(line):
            whole, frac, exp, pct = m.groups()
            digits = whole.replace(",", "") + (frac or "")
            value = float(digits) * (10 ** int(exp) if exp else 1)
            unit = 10 ** -(len(frac) - 1 if frac else 0) * (10 ** int(exp) if exp else 1)
            found.append((lineno, m.group(0), value, unit / 2))
    return found


def unbacked(text: str, kept: dict) -> list[str]:
    """`line N: figure` for each figure of the doc that the kept results do not give at its
    printed precision (|value - figure| <= half a unit of its last printed digit)."""
    numbers, strings = backed_values(kept)
    ordered = sorted(numbers)
    bad = []
    for lineno, shown, value, half in figures(text):
        if math.isnan(value):
            ok = any(shown in s for s in strings)
        else:
            ok = _near(ordered, value, half * (1 + 1e-9) + 1e-12)
        if not ok:
            bad.append(f"line {lineno}: {shown}")
    return bad


def _near(ordered: list[float], value: float, tol: float) -> bool:
    import bisect

    i = bisect.bisect_left(ordered, value - tol)
    return i < len(ordered) and ordered[i] <= value + tol
