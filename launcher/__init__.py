"""Launch-side helpers for polyshift training jobs."""
