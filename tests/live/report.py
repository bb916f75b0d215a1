"""The live suite's pytest plugin: the Markdown report, the summary with counts, and no silent skips.

- Each check's outcome, layer (its marker) and measured value (the `measured` fixture, kept in the
  item's user_properties, so the JUnit XML has it too) are collected; at the end the report is written
  to --live-report (default reports/live.md) and the terminal gets counts per layer.
- On the lab target every check runs: a skip there is turned into a failure that quotes its reason.
- A check that could not read what it checks (a client's HomelabError) fails with that error's own
  words (what, where, the hint) instead of a traceback.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from homelab import live
from homelab.errors import HomelabError

HERE = Path(__file__).resolve().parent


class LiveReport:
    def __init__(self, config: pytest.Config, target: str) -> None:
        self.config = config
        self.target = target
        self.path = Path(config.getoption("--live-report"))
        self.records: dict[str, live.Record] = {}
        self.layers: dict[str, str] = {}
        self.measured: dict[str, str] = {}
        self.active = False
        self.started = datetime.datetime.now(datetime.UTC)
        self.clock = time.monotonic()

    @staticmethod
    def _ours(item: pytest.Item) -> bool:
        return HERE in Path(str(item.path)).parents

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if config.option.collectonly:
            return
        self.active = self.active or any(self._ours(item) for item in items)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report: pytest.TestReport = yield
        if not self._ours(item):
            return report
        self.layers[item.nodeid] = live.layer_of(m.name for m in item.iter_markers())
        excinfo = call.excinfo
        if report.failed and excinfo is not None and isinstance(excinfo.value, HomelabError):
            report.longrepr = f"could not read what this check needs: {live.describe_error(excinfo.value)}"
        if report.skipped and self.target == "lab" and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.outcome = "failed"
            reason = reason.removeprefix("Skipped: ")
            report.longrepr = f"skipped on the lab target, where every check must run: {reason}"
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.layers:
            return
        for key, value in report.user_properties:
            if key == "measured":
                self.measured[report.nodeid] = str(value)
        previous = self.records.get(report.nodeid)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = report.outcome
            if report.when == "setup" and report.failed:
                outcome = "error"
            self.records[report.nodeid] = live.Record(
                report.nodeid, self.layers[report.nodeid], outcome, self.measured.get(report.nodeid, ""),
                _message(report), report.duration)
        elif report.when == "teardown" and report.failed and previous is not None:
            self.records[report.nodeid] = live.Record(previous.nodeid, previous.layer, "error", previous.measured,
                                                      _message(report), previous.seconds)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.active:
            return
        text = live.render_report(list(self.records.values()), target=self.target,
                                  seconds=time.monotonic() - self.clock, started=self.started,
                                  inventory=self.config.getoption("--live-inventory") or "inventory/homelab.yaml")
        live.write_report(self.path, text)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.active:
            return
        terminalreporter.section("homelab live suite")
        for line in live.summary(list(self.records.values())):
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"report: {self.path}")


def _message(report: pytest.TestReport) -> str:
    if report.passed:
        return ""
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return str(crash.message).removeprefix("Failed: ")
    return str(report.longreprtext or report.longrepr or "")
