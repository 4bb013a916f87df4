"""`python -m benchmarks` is `splitlora-bench`."""
from benchmarks.cli import main

raise SystemExit(main())
