"""`splitlora-bench`: measurements of SplitLoRA, separate from the tests (which only smoke-run them)."""
