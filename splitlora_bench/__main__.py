"""`python -m splitlora_bench` is `splitlora-bench`."""
from splitlora_bench.cli import main

raise SystemExit(main())
