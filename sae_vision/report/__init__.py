"""The `report` stage: the static report, its findings table, pages, feature browser, dataset
examples and feature visualisation.
"""

from .stage import run as run_report

__all__ = ["run_report"]
