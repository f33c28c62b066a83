"""How pytest-xdist hands the suite to its workers (wired in `tests/conftest.py`).

Single tests go out one by one, in collection order (the conftest sorts it slowest first). A
module whose tests build on each other (a module fixture built once, a test that reads what the
one before wrote) goes whole to one worker. xdist's own `--dist loadgroup` cannot group under
pytest 9: it rewrites `item._nodeid`, which pytest 9 no longer reads.
"""

from __future__ import annotations

from collections.abc import Collection

import pytest
from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController


def unit(nodeid: str, whole_modules: Collection[str]) -> str:
    """What one worker is handed: a whole module of `whole_modules`, else one test."""
    module = nodeid.split("::", 1)[0]
    return module if module in whole_modules else nodeid


class WholeModulesElseTests(LoadScopeScheduling):
    """xdist's scope scheduler with a scope of one test, or of a whole module.

    Args:
        config: pytest's config.
        log: xdist's logger.
        whole_modules: the modules that go whole to one worker (paths as in node ids).
    """

    def __init__(self, config: pytest.Config, log, whole_modules: Collection[str]) -> None:
        super().__init__(config, log)
        self.whole_modules = frozenset(whole_modules)
        config.option.loadscopereorder = False  # keep the collection's (slowest-first) order

    def _split_scope(self, nodeid: str) -> str:
        return unit(nodeid, self.whole_modules)

    def remove_node(self, node: WorkerController) -> str | None:
        """Forget a worker that finished or crashed; return the test it crashed in (None if none).

        As xdist's, with two changes. Only the units with tests still to run are queued again
        (xdist's also queues the finished ones, each then handed to a worker as an empty batch, and
        the run can wait forever for a test that never comes). And when the crash is inside a whole
        module, the module's later tests are not handed to another worker, where they would run
        without the tests they build on and fail for reasons that hide the crash: each is reported
        as skipped, naming the test that crashed."""
        workload = self.assigned_work.pop(node)  # a KeyError for an unknown node, as xdist expects
        pending = [(scope, nodeid) for scope, tests in workload.items() for nodeid, done in tests.items() if not done]
        if not pending:
            return None
        scope, crashed = pending[0]  # a worker runs its units in the order they were sent
        unfinished = {s: tests for s, tests in workload.items() if not all(tests.values())}
        left = []
        if scope in self.whole_modules:
            left = [nodeid for nodeid, done in unfinished.pop(scope).items() if not done and nodeid != crashed]
        self.workqueue.update(unfinished)
        for other in self.assigned_work:
            self._reschedule(other)
        for nodeid in left:
            self._report_skipped(nodeid, f"not run: the worker crashed in {crashed}, which it builds on", node)
        return crashed

    def _report_skipped(self, nodeid: str, reason: str, node: WorkerController) -> None:
        path = nodeid.split("::", 1)[0]
        report = pytest.TestReport(nodeid=nodeid, location=(path, None, nodeid), keywords={}, outcome="skipped",
                                   longrepr=(path, None, f"Skipped: {reason}"), when="call")  # fmt: skip
        report.node = node  # type: ignore[attr-defined]
        self.config.hook.pytest_runtest_logreport(report=report)
