"""Time limits for a pytest session, as a plugin: ``-p pytest_limits`` with benchmarks/ on the path.

``--limit-per-test S`` fails a test phase (setup, call or teardown) that runs longer than S
seconds, with SIGALRM, so the session goes on to the next test; ``--limit-session S`` stops the
session between tests once S seconds have passed, and cuts the per-test limit to what is left
of it. Either way pytest ends through its own interrupt path, which still writes the JUnit XML
(``--junitxml``) with every test that ran; the GPU check (benchmarks/device_check.py) stops a
pytest stage that outlives its limit with SIGINT for the same reason.

It uses only the standard library and pytest, so it runs on a machine that cannot reach a
package registry. (pytest-timeout offers the same per-test limit through SIGALRM, and a
cooperative session limit from version 2.3, but a GPU machine may not have it installed.)
A test stuck inside one C call (a CUDA synchronize that never returns) sees the alarm only when
the call returns; the GPU check's SIGINT, then SIGKILL, covers that case.
"""

from __future__ import annotations

import contextlib
import signal
import time

import pytest

STOPPED = "limits: session limit"  # the line the GPU check reads from the log


def pytest_addoption(parser) -> None:
    group = parser.getgroup("limits", "time limits (benchmarks/pytest_limits.py)")
    group.addoption("--limit-per-test", type=float, default=0.0, metavar="S",
                    help="fail a test phase that runs longer than S seconds (0: no limit)")
    group.addoption("--limit-session", type=float, default=0.0, metavar="S",
                    help="start no test after S seconds (0: no limit)")


def pytest_configure(config) -> None:
    _answer_sigint()
    per_test = config.getoption("--limit-per-test")
    session = config.getoption("--limit-session")
    if per_test < 0 or session < 0:
        raise pytest.UsageError("--limit-per-test and --limit-session must be >= 0")
    if per_test or session:
        config.pluginmanager.register(Limits(per_test, session), "limits")


def _answer_sigint() -> None:
    """Make SIGINT interrupt the session even where it arrives ignored: a shell without job
    control starts a background command (``bash check.sh &`` in a job script) with SIGINT
    ignored, the children inherit that, and the GPU check's SIGINT would then go unanswered
    until its SIGKILL, which leaves no JUnit XML."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Limits:
    def __init__(self, per_test: float, session: float) -> None:
        self.per_test = per_test
        self.session = session
        self.started = time.monotonic()
        self.collected = 0
        self.ran = 0
        self.stopped_at: float | None = None

    def left(self) -> float:
        return self.session - (time.monotonic() - self.started) if self.session else 0.0

    def pytest_collection_finish(self, session) -> None:
        self.collected = len(session.items)
        self.started = time.monotonic()  # the limit is on running the tests

    @contextlib.contextmanager
    def _alarm(self, phase: str):
        seconds = self.per_test
        if self.session:
            seconds = min(seconds or self.session, max(self.left(), 1.0))
        if not seconds:
            yield
            return

        def expire(signum, frame):
            pytest.fail(f"over its time limit ({seconds:.0f} s, {phase})", pytrace=False)

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        with self._alarm("setup"):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        with self._alarm("call"):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        with self._alarm("teardown"):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        result = yield
        self.ran += 1
        if self.session and self.left() <= 0 and nextitem is not None:
            self.stopped_at = time.monotonic() - self.started
            item.session.shouldstop = (f"{STOPPED} of {self.session:.0f} s reached after "
                                       f"{self.ran} of {self.collected} tests")
        return result

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.stopped_at is not None:
            terminalreporter.write_line(
                f"{STOPPED} of {self.session:.0f} s reached after {self.ran} of "
                f"{self.collected} tests ({self.stopped_at:.0f} s)")
