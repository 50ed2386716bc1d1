"""Autoreloader: a real child process re-executes when a watched file changes.

The child (written below into the test's temp directory) runs a
``busd.Bus`` with an Autoreloader that watches every imported module but
``unwatched_mod`` (``match``) plus one extra data file (``files``). Each
process image counts itself through an environment variable that survives
``execv``, so a re-exec shows as generation N+1 under the same PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from helpers import ROOT, record_log, wait_for

from busd import Bus
from busd.plugins import Autoreloader
from busd.plugins.tasks import MONITOR_START_PRIORITY

DEADLINE = 20.0

CHILD = textwrap.dedent(
    """
    import os
    import sys
    import threading

    import unwatched_mod
    import watched_mod

    from busd import Bus
    from busd.plugins import Autoreloader

    record_path, data_file = sys.argv[1], sys.argv[2]
    generation = int(os.environ.get("RELOAD_GENERATION", "0")) + 1
    os.environ["RELOAD_GENERATION"] = str(generation)  # execv keeps it
    lock = threading.Lock()


    def record(*words):
        with lock, open(record_path, "a") as out:
            out.write(" ".join(str(w) for w in (generation, *words)) + "\\n")


    class CountingReloader(Autoreloader):
        sweeps = 0

        def run(self):
            super().run()
            self.sweeps += 1
            record("sweep", self.sweeps, len(self.mtimes))


    bus = Bus()
    bus.subscribe("log", lambda msg, level: record("log", msg))
    reloader = CountingReloader(bus, frequency=0.05, match=r"^(?!unwatched_mod$)")
    reloader.files.add(data_file)
    reloader.subscribe()
    record("pid", os.getpid(), watched_mod.VALUE, unwatched_mod.VALUE)
    bus.start()
    bus.block(interval=0.05)
    """
)


class Child:
    """The child's record file, read as lines of words."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split(" ") for line in self.path.read_text().splitlines()]

    def sweeps(self, generation: int) -> int:
        """Sweeps done by that generation that had files in ``mtimes``."""
        counts = [
            int(words[2])
            for words in self.lines()
            if words[0] == str(generation) and words[1] == "sweep" and words[3] != "0"
        ]
        return max(counts, default=0)

    def logs(self) -> list[str]:
        return [" ".join(words[2:]) for words in self.lines() if words[1] == "log"]

    def pids(self) -> dict[int, int]:
        return {int(w[0]): int(w[2]) for w in self.lines() if w[1] == "pid"}


def touch_later(path: Path) -> None:
    """Give ``path`` a modification time clearly after any time seen so far."""
    later = path.stat().st_mtime + 10
    os.utime(path, (later, later))


@pytest.fixture
def child(tmp_path):
    for name in ("watched_mod", "unwatched_mod"):
        (tmp_path / f"{name}.py").write_text(f"VALUE = {name!r}\n")
    (tmp_path / "data.txt").write_text("data\n")
    (tmp_path / "child.py").write_text(CHILD)
    record = tmp_path / "record.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    env.pop("RELOAD_GENERATION", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(record), "data.txt"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield process, Child(record)
    finally:
        process.kill()
        process.wait(DEADLINE)


def test_changed_module_re_executes_the_process_other_files_as_configured(
    child, tmp_path
):
    process, record = child
    wait_for(lambda: record.sweeps(1) >= 1, DEADLINE, "the first sweep")

    # Not watched (match excludes it): full sweeps after the change, no restart.
    touch_later(tmp_path / "unwatched_mod.py")
    done = record.sweeps(1)
    wait_for(lambda: record.sweeps(1) >= done + 2, DEADLINE, "two more sweeps")
    assert record.pids() == {1: process.pid}
    assert not [msg for msg in record.logs() if msg.startswith("Restarting")]

    # A watched module: the same PID runs a new image (generation 2).
    touch_later(tmp_path / "watched_mod.py")
    wait_for(lambda: 2 in record.pids(), DEADLINE, "the re-executed process")
    assert record.pids() == {1: process.pid, 2: process.pid}
    assert process.poll() is None
    logs = record.logs()
    restart = logs.index(f"Restarting because {tmp_path / 'watched_mod.py'} changed.")
    # The thread is named after the class, as in CherryPy.
    assert logs[restart + 1] == "Stopped thread 'CountingReloader'."
    assert "Bus EXITED" in logs[restart:]

    # A path in ``files``, relative to the directory the child started in.
    wait_for(lambda: record.sweeps(2) >= 1, DEADLINE, "generation 2 sweeping")
    touch_later(tmp_path / "data.txt")
    wait_for(lambda: 3 in record.pids(), DEADLINE, "the second re-exec")
    assert record.pids()[3] == process.pid

    process.send_signal(signal.SIGTERM)
    assert process.wait(DEADLINE) == -signal.SIGTERM


def test_attributes_and_defaults_are_cherrypys():
    bus = Bus()
    reloader = Autoreloader(bus)
    assert reloader.frequency == 1
    assert reloader.match == ".*"
    assert reloader.files == set() and reloader.mtimes == {}
    assert reloader.callback == reloader.run
    assert reloader.thread is None
    assert reloader.start.priority == MONITOR_START_PRIORITY == 70


def test_sysfiles_follow_match_and_only_real_files():
    bus = Bus()
    every = Autoreloader(bus).sysfiles()
    assert os.path.abspath(threading.__file__) in every
    assert all(os.path.isabs(path) for path in every)
    only_busd = Autoreloader(bus, match=r"busd\.").sysfiles()
    assert only_busd and all("busd" in path for path in only_busd)
    assert os.path.abspath(threading.__file__) not in only_busd


def test_a_file_missing_when_first_seen_is_ignored_a_deleted_one_restarts(tmp_path):
    bus = Bus()
    log = record_log(bus)
    restarts = []
    bus.restart = lambda: restarts.append(True)
    reloader = Autoreloader(bus, match="^$")  # no module: only ``files``
    kept, missing = tmp_path / "kept.txt", tmp_path / "missing.txt"
    kept.write_text("x")
    reloader.files |= {str(kept), str(missing)}
    reloader.run()
    assert reloader.mtimes == {str(kept): kept.stat().st_mtime, str(missing): None}
    missing.write_text("appears later: still not watched")
    reloader.run()
    assert restarts == []
    kept.unlink()
    reloader.run()
    assert restarts == [True]
    assert (f"Restarting because {kept} changed.", 20) in log
