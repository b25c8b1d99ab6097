"""The engine loop, device-agnostic: requests in, deltas out. It reaches the model only through
an executor (executor.py)."""
