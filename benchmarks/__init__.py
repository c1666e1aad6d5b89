"""Benchmarks for sae-vision: every figure is a ratio measured side by side in one run.

`python -m benchmarks.run` (or `make bench`) writes artifacts/bench/results.json, a scaling
figure, and prints a Markdown table. See BENCHMARKS.md for the latest figures.
"""
