"""The SplitLoRA server: the split-training service, its compute engine and the aggregator."""
