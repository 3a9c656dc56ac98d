"""Training methods: pure tensor math, Hugging Face injection and megatron stages, behind a registry."""
