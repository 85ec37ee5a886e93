"""`python -m edgepack.cli ...` is `edgepack ...` (used where the console script is not on PATH)."""

from edgepack.cli import main

main()
