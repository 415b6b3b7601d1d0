"""Example workflows and handlers, importable by ``orchestrator-kafka run`` and ``worker``."""
