"""How `edgefleet rollout` shows a rollout: its state and reason, and a bar per wave."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = ["STYLES", "goal", "render", "state_counts", "summary"]

STYLES = {
    "ACTIVE": "green", "REMOVED": "green", "DEPLOYING": "yellow", "REVERTING": "yellow",
    "PENDING": "dim", "SKIPPED": "dim", "FAILED": "red", "REVERT_FAILED": "bold red",
    "REVERTED": "magenta", "IN_PROGRESS": "yellow", "PAUSED": "cyan", "ABORTING": "red",
    "COMPLETED": "bold green", "ABORTED": "bold red", "SUPERSEDED": "magenta",
}  # fmt: skip
# Target states still waiting on something: the rest have their answer.
_OPEN = ("PENDING", "DEPLOYING", "REVERTING")


def state_counts(counts: dict[str, int]) -> Text:
    """``ACTIVE 3 · FAILED 1 · PENDING 2``: answered states first, each in its colour."""
    text = Text()
    for state, count in sorted(counts.items(), key=lambda kv: (kv[0] in _OPEN, kv[0])):
        if text:
            text.append(" · ")
        text.append(f"{state} {count}", style=STYLES.get(state, ""))
    return text


def goal(rollout: dict[str, Any]) -> str:
    """What the rollout does: ``digits-edge → v2`` or ``undeploy digits-edge``."""
    if rollout["undeploy"]:
        return f"undeploy {rollout['model']}"
    return f"{rollout['model']} → v{rollout['version']}"


def _headline(rollout: dict[str, Any]) -> Text:
    state = rollout["state"]
    line = Text(f"rollout {rollout['id']} · {goal(rollout)} · ")
    line.append(state, style=STYLES.get(state, ""))
    if rollout["waves"]:
        shown = min(max(rollout["current_wave"], 0) + 1, rollout["waves"])
        line.append(f" · wave {shown} of {rollout['waves']}")
    return line


def render(rollout: dict[str, Any], note: str | None = None) -> RenderableType:
    """A rollout as the live view shows it: state and reason, then one bar per wave (counted
    from 1 here, the canary being wave 1; the REST API counts from 0)."""
    waves = Table.grid(padding=(0, 1))
    for wave in rollout.get("progress", []):
        states: dict[str, int] = wave["states"]
        answered = sum(n for s, n in states.items() if s not in _OPEN)
        current = wave["wave"] == rollout["current_wave"] and rollout["state"] == "IN_PROGRESS"
        label = Text(f"wave {wave['wave'] + 1}", style="bold" if current else "")
        bar = ProgressBar(total=wave["devices"], completed=answered, width=24)
        waves.add_row(label, bar, f"{answered}/{wave['devices']}", state_counts(states))
    parts: list[RenderableType] = [_headline(rollout)]
    if rollout.get("reason"):
        parts.append(Text(f"reason: {rollout['reason']}", style="italic"))
    parts += [
        waves,
        Text(f"{rollout['devices']} devices: ").append_text(state_counts(rollout["states"])),
    ]
    if note:
        parts.append(Text(note, style="dim"))
    return Group(*parts)


def summary(rollout: dict[str, Any]) -> str:
    """One line for the end of a watch or an operator's command."""
    reason = f" ({rollout['reason']})" if rollout.get("reason") else ""
    return f"rollout {rollout['id']} {rollout['state']}{reason}: {state_counts(rollout['states'])}"
