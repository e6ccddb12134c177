"""`python -m flexserve.cli`: the same as the `flexserve` command."""

from flexserve.cli import main

main()
