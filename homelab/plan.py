"""Changes and plans: what a layer found, what it would do, and how that reads to a person.

A layer's `plan()` returns a LayerPlan: a list of Changes (create / update / delete, each with a
one-line summary and field diffs) and no-ops with the reason nothing is needed. Applying runs
each Change's `apply` callable in order; `--dry-run` never calls them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape

Action = Literal["create", "update", "delete", "noop"]
SYMBOL = {"create": "+", "update": "~", "delete": "-", "noop": "="}
COLOUR = {"create": "green", "update": "yellow", "delete": "red", "noop": "dim"}


@dataclass(frozen=True)
class FieldDiff:
    name: str
    old: Any
    new: Any

    def text(self) -> str:
        if self.old is None:
            return f"{self.name}: {self.new}"
        if self.new is None:
            return f"{self.name}: {self.old} -> (removed)"
        return f"{self.name}: {self.old} -> {self.new}"


@dataclass
class Change:
    """One step that closes a gap, or a no-op with its reason.

    `summary` is the one line a person reads; `fields` the field-level diff; `note` says what the
    change implies (for example that it takes effect only after a reboot).
    """

    layer: str
    kind: str
    name: str
    action: Action
    summary: str
    fields: tuple[FieldDiff, ...] = ()
    note: str | None = None
    apply: Callable[[], object] | None = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "name": self.name,
            "action": self.action,
            "summary": self.summary,
            "fields": [{"name": f.name, "old": f.old, "new": f.new} for f in self.fields],
            **({"note": self.note} if self.note else {}),
        }


@dataclass
class LayerPlan:
    layer: str
    changes: list[Change] = field(default_factory=list)
    # Facts read along the way that a person should see (e.g. Ceph health), and warnings.
    facts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Steps to run after every change (e.g. waiting for started VMs), only when something changed.
    finish: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def pending(self) -> list[Change]:
        return [c for c in self.changes if c.action != "noop"]

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action == action)

    def add(self, change: Change) -> Change:
        self.changes.append(change)
        return change


def diff_fields(actual: dict[str, Any], desired: dict[str, Any]) -> tuple[FieldDiff, ...]:
    """Field diffs for every desired key whose actual value differs (values compared as given)."""
    return tuple(FieldDiff(k, actual.get(k), v) for k, v in desired.items() if actual.get(k) != v)


def render(plan: LayerPlan, out: Console, verbose: bool = False) -> None:
    """Print a plan the way Terraform does: + create, ~ update, - delete, and = for no-ops."""
    counts = ", ".join(f"{plan.count(a)} to {a}" for a in ("create", "update", "delete"))
    out.print(f"[bold]{plan.layer}[/]: {counts}, {plan.count('noop')} unchanged")
    for fact in plan.facts:
        out.print(f"  [cyan]i[/] {escape(fact)}")
    for warning in plan.warnings:
        out.print(f"  [bold yellow]![/] {escape(warning)}")
    for change in plan.changes:
        if change.action == "noop" and not verbose:
            continue
        colour = COLOUR[change.action]
        out.print(f"  [{colour}]{SYMBOL[change.action]} {change.kind} {escape(change.name)}[/]: "
                  f"{escape(change.summary)}")
        for diff in change.fields:
            out.print(f"      {escape(diff.text())}")
        if change.note:
            out.print(f"      [italic]{escape(change.note)}[/]")
    if not verbose and plan.count("noop"):
        out.print(f"  [dim]= {plan.count('noop')} unchanged: "
                  + escape("; ".join(f"{c.kind} {c.name} ({c.summary})" for c in plan.changes
                                     if c.action == "noop")) + "[/]")
