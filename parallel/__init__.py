"""Process groups, engines (DeepSpeed ZeRO-3; Megatron-core TP/PP) and collectives."""
