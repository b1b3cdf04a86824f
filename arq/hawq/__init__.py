"""HAWQ-V3, the Hessian-aware baseline: per-layer Hessian traces (hessian.py), then bits by an integer linear
program under the BitOps budget (ilp.py)."""
