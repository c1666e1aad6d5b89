"""The `evaluate` stage: reconstruction, feature health and the splice on held-out data, the
census per run, and the sweep summary.
"""

from .stage import run as run_evaluate
from .summary import summary_row

__all__ = ["run_evaluate", "summary_row"]
