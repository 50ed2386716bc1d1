"""``busd check-config`` checks what a config points at, not only the file.

The handlers are imported in a throw-away interpreter with the broker's
environment, working directory and PYTHONPATH, as its worker would import
them; each ``command`` is looked up on the worker's PATH. Every problem is
reported, one line naming file, table and key, exit status 78. Real
``busd`` processes on config files in a temp directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, TESTS, busctl_env, wait_for

DEADLINE = 60.0


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "busd", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=busctl_env(),
        check=False,
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_every_broken_broker_is_reported_with_file_table_and_key(tmp_path):
    # Before: "OK (8 brokers)" and exit 0.
    write(tmp_path / "raiser.py", "1 / 0\n")
    write(tmp_path / "plain.txt", "not a program\n")
    config = write(
        tmp_path / "busd.toml",
        f"""
[brokers.fine]
handler = "examples.stock:OrderBroker"
cwd = "{ROOT}"

[brokers.nomodule]
handler = "no_such_module_for_busd:Broker"

[brokers.noattribute]
handler = "examples.stock:NoSuchBroker"
cwd = "{ROOT}"

[brokers.raises]
handler = "raiser:Broker"

[brokers.notonpath]
command = ["no-such-program-for-busd", "--flag"]

[brokers.notexecutable]
command = ["./plain.txt"]

[brokers.ownpath]
command = ["sh", "-c", "true"]
env = {{ PATH = "/nonexistent" }}

[brokers.nodirectory]
handler = "brokers_for_tests:Recorder"
cwd = "missing"
""",
    )
    result = check(config)
    assert (result.returncode, result.stdout) == (78, "")
    assert result.stderr.splitlines() == [
        f"busd: {config}: [brokers.notonpath] command[0]: "
        '"no-such-program-for-busd" is not on the worker\'s PATH '
        f"({os.environ['PATH']})",
        f'{config}: [brokers.notexecutable] command[0]: "./plain.txt": '
        f"{tmp_path / 'plain.txt'} is not executable (mode 0644)",
        f'{config}: [brokers.ownpath] command[0]: "sh" is not on the worker\'s '
        "PATH (/nonexistent)",
        f'{config}: [brokers.nodirectory] cwd: "missing" ({tmp_path / "missing"}) '
        "does not exist",
        f"{config}: [brokers.nomodule] handler: cannot import handler module "
        "'no_such_module_for_busd': No module named 'no_such_module_for_busd'",
        f"{config}: [brokers.noattribute] handler: module 'examples.stock' has no "
        "'NoSuchBroker'",
        f"{config}: [brokers.raises] handler: importing it raised "
        "ZeroDivisionError: division by zero",
    ]


def test_handlers_are_imported_with_the_brokers_env_cwd_and_pythonpath(tmp_path):
    # Each module is found only the way its worker finds it: through the
    # broker's PYTHONPATH, or its cwd (relative to the config file's
    # directory); and one needs a variable of the broker's env at import.
    write(tmp_path / "extra" / "via_pythonpath.py", "class Broker: pass\n")
    write(tmp_path / "work" / "via_cwd.py", "class Broker: pass\n")
    write(
        tmp_path / "work" / "needs_env.py",
        "import os\nassert os.environ.get('NEEDED') == 'yes', 'NEEDED unset'\n"
        "class Broker: pass\n",
    )
    config = write(
        tmp_path / "etc" / "busd.toml",
        f"""
[brokers.a]
handler = "via_pythonpath:Broker"
env = {{ PYTHONPATH = "{tmp_path / "extra"}" }}

[brokers.b]
handler = "via_cwd:Broker"
cwd = "../work"

[brokers.c]
handler = "needs_env:Broker"
cwd = "../work"
env = {{ NEEDED = "yes" }}

[brokers.d]
handler = "needs_env:Broker"
cwd = "../work"
""",
    )
    result = check(config)
    assert result.returncode == 78
    assert result.stderr == (
        f"busd: {config}: [brokers.d] handler: importing it raised "
        "AssertionError: NEEDED unset\n"
    )
    write(config, config.read_text() + 'env = { NEEDED = "yes" }\n')
    result = check(config)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{config}: OK (4 brokers)\n"


def test_brokers_with_one_environment_share_one_interpreter(tmp_path):
    # Fast with many brokers: one interpreter per distinct environment, not
    # one per broker. Each module writes the PID that imported it.
    for index in range(6):
        write(
            tmp_path / f"mod{index}.py",
            "import os\n"
            f"open('imported-{index}', 'w').write(str(os.getpid()))\n"
            "class Broker: pass\n",
        )
    tables = [
        f'[brokers.b{index}]\nhandler = "mod{index}:Broker"\n'
        + ('env = { GROUP = "two" }\n' if index >= 4 else "")
        for index in range(6)
    ]
    config = write(tmp_path / "busd.toml", "\n".join(tables))
    result = check(config)
    assert (result.returncode, result.stderr) == (0, "")
    pids = [int((tmp_path / f"imported-{i}").read_text()) for i in range(6)]
    assert len(set(pids[:4])) == 1 and len(set(pids[4:])) == 1
    assert pids[0] != pids[4]


def test_a_missing_config_file_is_an_error_even_at_the_default_path(tmp_path):
    # Before: "/etc/busd/busd.toml: OK (0 brokers)" when that file did not exist.
    missing = tmp_path / "etc" / "busd.toml"
    program = (
        "import sys, busd.config, busd.cli\n"
        f"busd.config.DEFAULT_PATH = {str(missing)!r}\n"
        "sys.exit(busd.cli.main(['check-config']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=busctl_env(),
        check=False,
    )
    assert (result.returncode, result.stdout) == (78, "")
    assert result.stderr == (
        f"busd: {missing}: cannot read the config file: No such file or directory "
        "(busd would run on the built-in defaults; name a file with --config)\n"
    )
    named = check(missing)
    assert (named.returncode, named.stderr) == (
        78,
        f"busd: {missing}: cannot read the config file: No such file or directory\n",
    )


def test_the_test_brokers_and_the_example_pass(tmp_path):
    config = write(
        tmp_path / "busd.toml",
        f'[brokers.orders]\nhandler = "examples.stock:OrderBroker"\ncwd = "{ROOT}"\n'
        f'[brokers.rec]\nhandler = "brokers_for_tests:Recorder"\ncwd = "{TESTS}"\n'
        f'[brokers.cmd]\ncommand = ["{sys.executable}", "-c", "pass"]\n',
    )
    result = check(config)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{config}: OK (3 brokers)\n"


def test_busd_run_warns_about_a_missing_program_and_serves_the_others(start_busd):
    # Not a refusal: the other brokers run; this one fails at its start.
    daemon = start_busd(
        config_text=f'[brokers.good]\nhandler = "brokers_for_tests:Recorder"\n'
        f'cwd = "{TESTS}"\n\n'
        '[brokers.gone]\ncommand = ["no-such-program-for-busd"]\n'
    )
    with daemon.client() as client:
        wait_for(
            lambda: (
                client.state()["brokers"]["good"]["instances"][0]["state"] == "RUNNING"
            ),
            what="the good broker",
        )
    assert (
        f"{daemon.config}: [brokers.gone] command[0]: "
        '"no-such-program-for-busd" is not on the worker\'s PATH'
    ) in daemon.log_text()
    assert "its instances cannot start" in daemon.log_text()
    assert daemon.stop() == 0
