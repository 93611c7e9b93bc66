from subspace_cli.cli import run

run()
