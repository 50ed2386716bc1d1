"""CherryPy 18.10's own cherrypy/test/test_states.py, run on busd's bus and plugins.

The issue 16 promise: ``busd.Bus`` and ``busd.plugins`` are drop-ins for
CherryPy's, so CherryPy's own state tests (start, stop, graceful, block,
Ctrl-C, autoreload, start errors, daemonizing, SIGHUP, SIGTERM, signal
handler unsubscribe) must give the same results with ``cherrypy.engine`` a
``busd.Bus`` and CherryPy's plugin classes replaced by busd's.

How it runs:

- CherryPy's test files come from the installed ``cherrypy==18.10.0`` (the
  test extra): its wheel ships ``cherrypy/test``, byte for byte the files of
  the 18.10.0 sdist (their SHA-256 is pinned below, so a different copy is
  a loud failure, never a silent change of the reference). No network is
  needed at test time.
- The package is copied to a temporary directory: test_states writes its
  config, PID file and logs beside itself and touches
  ``_test_states_demo.py`` to trigger the autoreloader; none of that may
  land in the virtualenv.
- pytest runs the copy's test_states.py in a subprocess with
  tests/cherrypy_substitute first on PYTHONPATH. Its sitecustomize.py does
  the substitution in that process and in every demo server it starts
  (they inherit the environment), and records in each process which bus
  and plugin classes it got; this test checks those records.
- As root (CI, the dev machines), the run gets its own network and PID
  namespaces: test_states uses fixed ports (54583, 8081) that another run
  on the machine could hold, and the namespace's end ends every process
  the run started, including a hung or daemonized demo server; the two
  runs below then go side by side. Elsewhere they run one after the other,
  and the leftovers are found by their command line (the temporary copy's
  config file) and ended by PID.
- The same run with CherryPy's own bus and plugins is the reference: it
  must pass 14/14, so a failure on busd's side is busd's.

Where busd stands: 14 of 14, as CherryPy itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cherrypy
import psutil
import pytest
from helpers import ROOT

#: The plugin classes the harness replaces by busd's: the six the issue names,
#: and the Autoreloader that cherrypy.engine.autoreload is made from (with
#: the Monitor and PerpetualTimer that complete the set).
SUBSTITUTED_PLUGINS = (
    "SignalHandler",
    "PIDFile",
    "Daemonizer",
    "DropPrivileges",
    "ThreadManager",
    "BackgroundTask",
    "PerpetualTimer",
    "Monitor",
    "Autoreloader",
)

#: SHA-256 of the files in the cherrypy-18.10.0 sdist.
PINNED_SHA256 = {
    "test/test_states.py": (
        "cf4029af5c0a8539ae3ea08d471f3b44c2d2831b0fb2800be68b0b37ba10dca8"
    ),
    "test/_test_states_demo.py": (
        "955a5ba878077087ddcf5fa2eb10db9b3983f3b57725bc03fdee252b405a827c"
    ),
    "test/helper.py": (
        "100f9f6d7034d2dc049894153150472df817db40559a49a563cf2d7ee7810e23"
    ),
}

ALL_TESTS = frozenset(
    {
        "ServerStateTests::test_0_NormalStateFlow",
        "ServerStateTests::test_1_Restart",
        "ServerStateTests::test_2_KeyboardInterrupt",
        "ServerStateTests::test_4_Autoreload",
        "ServerStateTests::test_5_Start_Error",
        "ServerStateTests::test_gc",
        "PluginTests::test_daemonize",
        "PluginTests::test_gc",
        "SignalHandlingTests::test_SIGHUP_tty",
        "SignalHandlingTests::test_SIGHUP_daemonized",
        "SignalHandlingTests::test_SIGTERM",
        "SignalHandlingTests::test_signal_handler_unsubscribe",
        "SignalHandlingTests::test_gc",
        "test_safe_wait_INADDR_ANY",
    }
)


SUBSTITUTE_DIR = Path(__file__).resolve().parent / "cherrypy_substitute"
# A hung test (SIGHUP ignored, say) fails after this, so the run ends.
PER_TEST_TIMEOUT = 60
RUN_TIMEOUT = 600


def cherrypy_copy(dest: Path) -> Path:
    """Copy the installed cherrypy package into ``dest``; return dest.

    Fails, naming the file, when a test file is missing or is not the one
    of the 18.10.0 sdist.
    """
    package = Path(cherrypy.__file__).resolve().parent
    for relative, digest in PINNED_SHA256.items():
        path = package / relative
        assert path.is_file(), (
            f"{path} is missing: this harness needs CherryPy 18.10.0's test "
            "files, which its wheel ships (pip install -e '.[test]')"
        )
        found = hashlib.sha256(path.read_bytes()).hexdigest()
        assert found == digest, (
            f"{path} is not CherryPy 18.10.0's (sha256 {found}, the sdist's "
            f"is {digest}); reinstall cherrypy==18.10.0"
        )
    shutil.copytree(
        package, dest / "cherrypy", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


def namespaces_available() -> bool:
    """Whether this process may give a run its own network and PID namespaces."""
    return (
        os.geteuid() == 0
        and shutil.which("unshare") is not None
        and shutil.which("ip") is not None
    )


def isolated(command: list[str]) -> list[str]:
    """``command`` in new network and PID namespaces, when we may make them."""
    if not namespaces_available():
        return command
    # sh stays PID 1 of the namespace (no exec): when it ends, the kernel
    # ends every process left in it.
    ip = shutil.which("ip")
    script = f'{ip} link set lo up && "$@"; status=$?; exit "$status"'
    return ["unshare", "--net", "--pid", "--fork", "sh", "-c", script, "sh", *command]


def end_leftovers(marker: str) -> None:
    """End, by PID, the processes of this run still alive (outside namespaces)."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(marker in part for part in cmdline):
            try:
                process.kill()
                process.wait(10)
            except psutil.Error:
                pass


@dataclass
class StatesRun:
    """test_states.py run with ``bus`` ("busd" or "cherrypy"), as a subprocess.

    ``outcomes`` maps each test id to "passed", "failed", "error" or
    "skipped"; ``records`` are the records of every process that loaded
    CherryPy; ``output`` is pytest's.
    """

    outcomes: dict[str, str]
    records: list[dict[str, Any]]
    output: str


def start_test_states(tmp_path: Path, bus: str) -> Callable[[], StatesRun]:
    """Start the run; return the function that waits for it and reads it."""
    copy = cherrypy_copy(tmp_path / "cherrypy-copy")
    report = tmp_path / "report.xml"
    record = tmp_path / "record.jsonl"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(SUBSTITUTE_DIR), str(copy), str(ROOT)]),
        BUSD_CHERRYPY_BUS=bus,
        BUSD_CHERRYPY_PLUGINS=",".join(SUBSTITUTED_PLUGINS),
        BUSD_CHERRYPY_RECORD=str(record),
    )
    (copy / "pytest.ini").write_text("[pytest]\n")  # no config from above
    command = [
        sys.executable,
        "-m",
        "pytest",
        "cherrypy/test/test_states.py",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--timeout={PER_TEST_TIMEOUT}",
        f"--junitxml={report}",
    ]
    process = subprocess.Popen(
        isolated(command),
        cwd=copy,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def finish() -> StatesRun:
        try:
            output, _ = process.communicate(timeout=RUN_TIMEOUT)
        finally:
            process.kill()
            process.wait()
            end_leftovers(str(copy))
        assert report.exists(), (
            f"test_states.py ran no test (exit {process.returncode}):\n{output[-6000:]}"
        )
        outcomes = {}
        for case in ET.parse(report).iter("testcase"):
            classname = case.get("classname", "").rsplit(".", 1)[-1]
            name = case.get("name", "")
            test_id = name if classname == "test_states" else f"{classname}::{name}"
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = "failed" if tag == "failure" else tag
            outcomes[test_id] = outcome
        records = [json.loads(line) for line in record.read_text().splitlines()]
        return StatesRun(outcomes, records, output)

    return finish


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StatesRun]:
    """Both runs; side by side when each has its own namespaces (half the time)."""
    results = {}
    if namespaces_available():
        pending = {
            bus: start_test_states(tmp_path_factory.mktemp(bus), bus)
            for bus in ("cherrypy", "busd")
        }
        for bus, finish in pending.items():
            results[bus] = finish()
    else:  # one after the other: both would use the same ports
        for bus in ("cherrypy", "busd"):
            results[bus] = start_test_states(tmp_path_factory.mktemp(bus), bus)()
    return results


def check_records(
    records: list[dict[str, Any]], bus_class: str, plugin_module: str
) -> None:
    """Every process that loaded CherryPy ran on ``bus_class`` and those plugins."""
    buses = {r["classes"]["bus"] for r in records if r["module"] == "wspbus"}
    assert buses == {bus_class}
    plugins = [r["classes"] for r in records if r["module"] == "plugins"]
    for classes in plugins:
        assert set(classes) == set(SUBSTITUTED_PLUGINS)
        for name, qualname in classes.items():
            assert qualname.startswith(plugin_module), (name, qualname)
    # The pytest process and the demo servers test_states starts (at least
    # one per CPProcess: 9 of them): the substitution reached the children.
    assert len({r["pid"] for r in records if r["module"] == "wspbus"}) >= 9


def test_cherrypy_test_states_with_cherrypy_itself_passes_14_of_14(runs):
    run = runs["cherrypy"]
    check_records(run.records, "cherrypy.process.wspbus.Bus", "cherrypy.process.")
    assert set(run.outcomes) == ALL_TESTS
    failed = {test for test, outcome in run.outcomes.items() if outcome != "passed"}
    assert not failed, run.output[-6000:]


def test_cherrypy_test_states_with_busd_bus_and_plugins_passes_14_of_14(runs):
    run = runs["busd"]
    check_records(run.records, "busd.bus.Bus", "busd.plugins.")
    assert set(run.outcomes) == ALL_TESTS
    failed = {test for test, outcome in run.outcomes.items() if outcome != "passed"}
    assert not failed, run.output[-6000:]
