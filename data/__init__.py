"""Instruction data: the built-in parallel set and loaders for external sources."""
