"""The package's modules import each other without a circle (the pure core's own rule is checked by
import-linter in scripts/test: see ``[tool.importlinter]`` in pyproject.toml)."""

from __future__ import annotations

import grimp


def test_no_module_of_the_package_imports_itself_through_another() -> None:
    graph = grimp.build_graph("orchestrator_kafka")
    modules = sorted(m for m in graph.modules if m.startswith("orchestrator_kafka."))
    circles = sorted(
        (module, imported)
        for module in modules
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.startswith("orchestrator_kafka.")
        and graph.chain_exists(importer=imported, imported=module)
    )
    assert circles == []
