"""A workflow definition as a Mermaid flowchart: steps, conditions, parallel groups, compensations."""

from __future__ import annotations

from .workflow import WorkflowDefinition, WorkflowStep


def mermaid(definition: WorkflowDefinition) -> str:
    """The definition as Mermaid ``flowchart TD`` text.

    Stages run top to bottom; a parallel group is a subgraph whose branches fork and join; a
    conditional step is drawn behind a decision that may skip it; each compensation hangs off its step
    by a dotted edge (they run in reverse order of completion, the failed step's own first).
    Node ids are by position, so distinct step names never share a node.
    """
    ids = {step.name: f"s{i}" for i, step in enumerate(definition.get_steps())}

    def _id(step: WorkflowStep) -> str:
        return ids[step.name]

    def _node(step: WorkflowStep) -> str:
        label = f"{step.name}<br/><small>worker: {step.worker_name}"
        if step.timeout is not None:
            label += f", timeout {step.timeout:g}s"
        return f'{_id(step)}["{_quote(label)}</small>"]'

    lines = ["flowchart TD", "  start([start])"]
    previous = ["start"]
    for index, stage in enumerate(definition.stages):
        if len(stage) > 1:
            lines.append(f'  subgraph parallel_{index}["parallel"]')
            lines.extend(f"    {_node(step)}" for step in stage)
            lines.append("  end")
            for step in stage:
                lines.extend(f"  {p} --> {_id(step)}" for p in previous)
            previous = [_id(step) for step in stage]
        else:
            [step] = stage
            if step.condition is not None:
                decision = f"if_{_id(step)}"
                lines.append(f'  {decision}{{"{_quote(_condition_label(step))}"}}')
                lines.extend(f"  {p} --> {decision}" for p in previous)
                lines.append(f"  {_node(step)}")
                lines.append(f"  {decision} -- yes --> {_id(step)}")
                previous = [_id(step), f"{decision} -- no"]
            else:
                lines.append(f"  {_node(step)}")
                lines.extend(f"  {p} --> {_id(step)}" for p in previous)
                previous = [_id(step)]
        for step in stage:
            if step.compensation:
                undo = f"undo_{_id(step)}"
                lines.append(f"  {undo}[/{_quote('compensate: ' + step.compensation)}/]")
                lines.append(f"  {_id(step)} -.-> {undo}")
    lines.append("  done([completed])")
    lines.extend(f"  {p} --> done" for p in previous)
    lines.append("  classDef compensation stroke-dasharray: 4 3")
    undos = [f"undo_{_id(s)}" for s in definition.get_steps() if s.compensation]
    if undos:
        lines.append(f"  class {','.join(undos)} compensation")
    return "\n".join(lines) + "\n"


def _condition_label(step: WorkflowStep) -> str:
    name = getattr(step.condition, "__name__", "")
    return f"{name}?" if name and name != "<lambda>" else f"run {step.name}?"


def _quote(text: str) -> str:
    # Mermaid labels: a double quote would end the label.
    return text.replace('"', "#quot;")
