"""LoRA with a frozen random A ("DP by sketching"): the mechanism and its sketch statistics."""
