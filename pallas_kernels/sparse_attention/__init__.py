"""Block-sparse attention over a BlockPlan (prefill); see `api.py` for backends, `reference.py` for semantics."""
