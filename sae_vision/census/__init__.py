"""The curve-detector census: synthetic stimuli, evidence and criteria, running networks and
SAEs on them, null networks, copies vs new detectors, and polysemantic neurons.
"""

from .features import FeatureInputs
from .layer_census import CensusInputs, NeuronCensusMemo, run_census
from .novelty import functional_novelty, functional_summary, response_correlation
from .polysemantic import decompose_run, split_selectivity

__all__ = [
    "CensusInputs",
    "FeatureInputs",
    "NeuronCensusMemo",
    "decompose_run",
    "functional_novelty",
    "functional_summary",
    "response_correlation",
    "run_census",
    "split_selectivity",
]
