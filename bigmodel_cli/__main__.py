"""`python -m bigmodel_cli` is the `bigmodel` command."""

from bigmodel_cli.cli import main

main()
