"""The SplitLoRA client: embeddings and the first blocks, trained on private data through the split server."""
