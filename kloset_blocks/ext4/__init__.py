# ext4 image synthesis: pure encoders for each on-disk structure (kernel field names verbatim)
# and the layout planner that turns a tree of Nodes into sorted image regions.
from __future__ import annotations

from kloset_blocks.ext4.layout import Layout, PlanOptions, Region, plan

__all__ = ["Layout", "PlanOptions", "Region", "plan"]
