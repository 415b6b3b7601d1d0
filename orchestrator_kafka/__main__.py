"""``python -m orchestrator_kafka``: the command line."""

from .cli import main

main()
