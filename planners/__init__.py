"""Planning: which experts to keep and the byte ranges that make the output (pure data).

:func:`plan_prune` is the entry point; it builds on :mod:`core` only.
"""

from planners.prune import PlanOptions, plan_prune

__all__ = ["PlanOptions", "plan_prune"]
