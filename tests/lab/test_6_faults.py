"""The live suite tells the truth: it passes on the converged lab, every fault of the catalog makes it fail
with at least the checks the catalog names, and it passes again once the fault is cleared."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from homelab.lab.faults import CATALOG, Fault

from .conftest import Lab, Result, invoke

MIN_CHECKS = 60


def suite(junit: Path) -> tuple[Result, dict[str, str]]:
    """Run `invoke test.live --target lab`; (the result, {node id relative to tests/live: outcome})."""
    result = invoke("test.live", "--target", "lab", "--junitxml", str(junit), timeout=300)
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = str(case.get("classname", "")).rsplit(".", 1)[-1]
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        outcomes[f"{module}.py::{case.get('name')}"] = outcome
    return result, outcomes


def tripped(check: str, outcomes: dict[str, str]) -> bool:
    """A named check failed: exactly, or (a bare parametrised name) for any of its params."""
    bad = {node for node, outcome in outcomes.items() if outcome in ("failed", "error")}
    return check in bad or ("[" not in check and any(node.startswith(check + "[") for node in bad))


@pytest.fixture(scope="module")
def converged(built: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    up = invoke("up", timeout=900)
    assert up.code == 0, up.text
    folder = tmp_path_factory.mktemp("live")
    result, outcomes = suite(folder / "clean.xml")
    assert result.code == 0, result.text
    assert len(outcomes) >= MIN_CHECKS and set(outcomes.values()) == {"passed"}, result.text  # none skipped
    built.timings["live suite on the converged lab"] = result.seconds
    built.timings["live suite checks"] = float(len(outcomes))
    yield folder
    invoke("lab.fault", "--clear", timeout=300)


@pytest.mark.parametrize("fault", CATALOG, ids=[f.name for f in CATALOG])
def test_each_fault_trips_the_checks_it_names(built: Lab, converged: Path, fault: Fault) -> None:
    injected = invoke("lab.fault", fault.name, timeout=300)
    try:
        assert injected.code == 0, injected.text
        result, outcomes = suite(converged / f"{fault.name}.xml")
        assert result.code != 0, f"the suite passed with {fault.name} active:\n{result.text}"
        missed = [check for check in fault.trips if not tripped(check, outcomes)]
        assert not missed, f"{fault.name}: these named checks did not fail: {missed}\n{result.text[-3000:]}"
    finally:
        cleared = invoke("lab.fault", "--clear", timeout=300)
    assert cleared.code == 0, cleared.text
    built.timings.setdefault("faults detected", 0.0)
    built.timings["faults detected"] += 1


def test_the_suite_passes_again_after_every_fault(converged: Path) -> None:
    result, outcomes = suite(converged / "after.xml")
    assert result.code == 0, result.text
    assert set(outcomes.values()) == {"passed"}
