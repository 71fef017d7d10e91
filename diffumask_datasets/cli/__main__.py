"""`python -m diffumask_datasets.cli`: the same as the `diffumask` command."""

from . import PROG, main

main(prog_name=PROG)
