"""Fixtures shared by the test suite: a real softpbx process, SIPp, failure reports.

Nothing here skips: a missing tool (SIPp) is a failure with the reason, because CI installs
it and a silently skipped integration test proves nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.server import PbxProcess

LOG_TAIL = 60
"""Lines of the softpbx log shown when a test using it fails."""


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


def _finish(request: pytest.FixtureRequest, procs: list[PbxProcess]) -> None:
    """Stop every process cleanly (asserting it); show the log tail when the test failed."""
    errors: list[str] = []
    for proc in procs:
        if _failed(request):
            tail = "\n".join(proc.all_logs().splitlines()[-LOG_TAIL:])
            print(f"--- softpbx log ({proc.workdir}), last {LOG_TAIL} lines ---\n{tail}")
        try:
            proc.stop()
        except AssertionError as exc:
            errors.append(str(exc))
        finally:
            proc.kill()
    if errors:
        pytest.fail("\n".join(errors))


PbxFactory = Callable[..., PbxProcess]


@pytest.fixture
def pbx_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PbxFactory]:
    """``pbx_factory(overrides={...})`` starts a softpbx on free ports with its db in tmp_path.

    Every process started is stopped with SIGTERM at teardown, which must exit cleanly.
    """
    procs: list[PbxProcess] = []

    def start(*, overrides: dict[str, str] | None = None, name: str | None = None) -> PbxProcess:
        proc = PbxProcess.create(tmp_path / (name or f"pbx{len(procs) + 1}"), overrides=overrides)
        procs.append(proc)
        proc.start()
        return proc

    yield start
    _finish(request, procs)


@pytest.fixture
def pbx(pbx_factory: PbxFactory) -> PbxProcess:
    """A running softpbx with the shipped sample profiles (101/102/103)."""
    return pbx_factory()


@pytest.fixture(scope="module")
def module_pbx(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxProcess]:
    """One softpbx for a whole module (fast suites of many small exchanges).

    A module may define ``PBX_OVERRIDES`` (a dict of ``--set`` keys) for it.
    """
    overrides = getattr(request.module, "PBX_OVERRIDES", None)
    proc = PbxProcess.create(tmp_path_factory.mktemp("pbx"), overrides=overrides)
    proc.start()
    try:
        yield proc
    finally:
        try:
            proc.stop()
        finally:
            proc.kill()


@pytest.fixture(scope="session")
def sipp_bin() -> str:
    """Path of the ``sipp`` binary; the test FAILS (never skips) when it is missing."""
    path = shutil.which("sipp")
    if path is None:
        pytest.fail("sipp not found on PATH: install SIPp (Debian/Ubuntu: apt-get install "
                    "sip-tester); the integration tests need it and are not skipped",
                    pytrace=False)
    return path
