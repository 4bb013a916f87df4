"""The split server's compute: the engine thread, cross-client batching and its training state."""
