"""How pytest-xdist hands the suite to its workers (wired in `tests/conftest.py`).

Single tests go out one by one, in collection order (the conftest sorts it slowest first). A
module whose tests build on each other (a module fixture built once, a test that reads what the
one before wrote) goes whole to one worker. xdist's own `--dist loadgroup` cannot group under
pytest 9: it rewrites `item._nodeid`, which pytest 9 no longer reads.
"""

from __future__ import annotations

from collections.abc import Collection

from xdist.scheduler import LoadScopeScheduling


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

    def __init__(self, config, log, whole_modules: Collection[str]) -> None:
        super().__init__(config, log)
        self.whole_modules = frozenset(whole_modules)
        config.option.loadscopereorder = False  # keep the collection's (slowest-first) order

    def _split_scope(self, nodeid: str) -> str:
        return unit(nodeid, self.whole_modules)

    def remove_node(self, node) -> str | None:
        """As xdist's, except when a worker crashes inside a whole module: xdist reports the test
        that crashed, and the module's later tests are not handed to another worker, where they
        would run without the tests they build on and fail for reasons that hide the crash."""
        workload = self.assigned_work.get(node, {})
        pending = [(scope, nodeid) for scope, tests in workload.items() for nodeid, done in tests.items() if not done]
        if not pending or pending[0][0] not in self.whole_modules:
            return super().remove_node(node)
        scope, crashed = pending[0]
        left = [nodeid for nodeid, done in workload[scope].items() if not done and nodeid != crashed]
        del self.assigned_work[node]
        del workload[scope]
        self.workqueue.update(workload)  # the node's other work, which xdist hands out again
        for other in self.assigned_work:
            self._reschedule(other)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and left:
            reporter.write_line(
                f"{scope}: the worker crashed in {crashed.split('::', 1)[-1]}; "
                f"{len(left)} later test(s) of the module not run (they build on it)",
                red=True,
            )
        return crashed
