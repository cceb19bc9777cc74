"""`python -m etcdha` runs the CLI."""
from etcdha.cli import main

main()
