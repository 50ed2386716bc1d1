"""The wheel holds everything busd needs: built, installed, and run elsewhere.

One wheel is built from a copy of the checkout (so that a stale ``build/``
directory cannot add files the source no longer has) and installed with
``--no-deps`` into a fresh virtualenv. Its dependencies are not downloaded:
the distributions the wheel's metadata requires (and theirs) are linked
from this test's own environment into a directory put on ``PYTHONPATH``,
and nothing else is, so an import the metadata does not declare fails
here. Every command runs with ``cwd=/``, so the checkout is never what
gets imported. Building needs setuptools from the package index (build
isolation), as ``pip install .`` does.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from busd._version import __version__

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("busd", "busctl")
# Environment that would change how busd behaves or what it imports.
SCRUBBED = (
    "PYTHONPATH",
    "BUSD_SOCKET",
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
    "VIRTUAL_ENV",
)

HANDLER = """\
from busd.plugins import SimplePlugin


class Echo(SimplePlugin):
    def main(self, message):
        self.bus.log(f"echo {message}")
"""


@dataclass
class Installed:
    """The wheel installed in a fresh virtualenv."""

    wheel: Path
    bin: Path
    env: dict[str, str]

    def run(self, *argv: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in argv],
            cwd="/",
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            REPO / package,
            source / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    dist = root / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source)
    (wheel,) = dist.glob("busd-*.whl")

    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python)
    _run(*pip, "install", "-q", "--no-deps", "--no-index", wheel)

    deps = root / "deps"
    deps.mkdir()
    for distribution in _required_distributions(wheel):
        _link_distribution(distribution, deps)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env["PYTHONPATH"] = str(deps)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    yield Installed(wheel, venv / "bin", env)


def _run(*argv: str | Path) -> None:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}{result.stderr}"


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def _requirement_name(requirement: str) -> str | None:
    """The distribution a Requires-Dist line needs, or None for extras only."""
    if "extra ==" in requirement:
        return None
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0)


def _required_distributions(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The wheel's runtime requirements and theirs, from this environment."""
    wanted = [
        name
        for line in _metadata(wheel).get_all("Requires-Dist") or []
        if (name := _requirement_name(line))
    ]
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        name = wanted.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        distribution = importlib.metadata.distribution(name)
        found[key] = distribution
        wanted += [
            dep
            for line in distribution.requires or []
            if (dep := _requirement_name(line))
        ]
    return list(found.values())


def _link_distribution(
    distribution: importlib.metadata.Distribution, into: Path
) -> None:
    """Symlink a distribution's top-level modules and packages into ``into``."""
    tops = set()
    for file in distribution.files or []:
        top = file.parts[0]
        if top == ".." or top.endswith((".dist-info", ".egg-info", ".pth")):
            continue
        if top == "__pycache__":
            continue
        tops.add(top)
    assert tops, f"{distribution.metadata['Name']} has no files to link"
    for top in tops:
        target = Path(distribution.locate_file(top))
        link = into / top
        if target.exists() and not link.exists():
            link.symlink_to(target)


# -- the tests -----------------------------------------------------------------


def test_the_wheel_holds_every_module_and_both_commands(installed: Installed) -> None:
    source = {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    with zipfile.ZipFile(installed.wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(
            archive.read(n).decode()
            for n in names
            if n.endswith(".dist-info/entry_points.txt")
        )
    missing = source - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "busd/plugins/__init__.py" in names
    assert "busd = busd.cli:main" in entry_points
    assert "busctl = busctl.cli:main" in entry_points
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))]


def test_the_wheel_declares_the_runtime_dependencies(installed: Installed) -> None:
    required = {
        _requirement_name(line).lower()
        for line in _metadata(installed.wheel).get_all("Requires-Dist") or []
        if _requirement_name(line)
    }
    assert required == {"msgpack", "psutil", "python-daemon"}


def test_both_commands_print_the_one_version(installed: Installed) -> None:
    assert _metadata(installed.wheel)["Version"] == __version__
    busd = installed.run(installed.bin / "busd", "--version")
    busctl = installed.run(installed.bin / "busctl", "--version")
    assert busd.stdout == f"busd {__version__}\n"
    assert busctl.stdout == f"busctl {__version__}\n"


def test_modules_import_from_the_installed_package(installed: Installed) -> None:
    result = installed.run(
        installed.bin / "python",
        "-c",
        "import busd, busd.worker, busd.plugins.sdnotify, busd.daemon, busctl.cli;"
        "print(busd.__file__); print(busctl.cli.__file__)",
    )
    for path in result.stdout.split():
        assert path.startswith(str(installed.bin.parent)), result.stdout


def test_check_config_accepts_the_example(installed: Installed, tmp_path: Path) -> None:
    # As root the file must be root-owned and not group/world-writable: a
    # copy made by this process, with mode 0644, is both. check-config
    # imports the example's handler from its cwd, "..": the copy's parent
    # holds the examples, as the repository root does.
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "busd.toml"
    shutil.copyfile(REPO / "etc" / "busd.toml", config)
    config.chmod(0o644)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    result = installed.run(installed.bin / "busd", "check-config", "--config", config)
    assert result.stdout == f"{config}: OK (1 broker)\n"


def test_the_installed_daemon_runs_a_broker(
    installed: Installed, tmp_path: Path
) -> None:
    """busd from the wheel starts a handler worker and delivers a message."""
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"busd-pkg-{os.getpid()}"
    run_dir.mkdir(mode=0o700)  # short: a socket path is at most 107 bytes
    try:
        (tmp_path / "echo_broker.py").write_text(HANDLER)
        config = tmp_path / "busd.toml"
        config.write_text(
            f'[busd]\nsocket = "{run_dir}/busd.sock"\npidfile = "{run_dir}/busd.pid"\n'
            f'\n[brokers.echo]\nhandler = "echo_broker:Echo"\ncwd = "{tmp_path}"\n'
        )
        config.chmod(0o644)
        _run_daemon_and_publish(installed, config, run_dir / "busd.sock")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_daemon_and_publish(installed: Installed, config: Path, sock: Path) -> None:
    daemon = subprocess.Popen(
        [installed.bin / "busd", "run", "--config", config],
        cwd="/",
        env=installed.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    busctl = [installed.bin / "busctl", "--socket", sock]
    try:
        deadline = time.monotonic() + 30
        while not _answers(sock):
            assert daemon.poll() is None, f"busd exited:\n{daemon.stderr.read()}"
            assert time.monotonic() < deadline, "busd did not answer within 30 s"
            time.sleep(0.05)
        published = installed.run(*busctl, "publish", "--wait", "main", "hello")
        assert published.stdout.endswith(": 1 acked, 0 dead\n"), published.stdout
        # The worker's log line and its ack travel on different pipes.
        deadline = time.monotonic() + 10
        while "echo hello" not in installed.run(*busctl, "logs", "echo").stdout:
            assert time.monotonic() < deadline, "no 'echo hello' in busctl logs echo"
            time.sleep(0.05)
        installed.run(*busctl, "shutdown")
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
