"""ShifCon: shift toward the dominant language for a band of layers, plus multilingual contrastive learning."""
