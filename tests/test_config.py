"""busd.config: defaults, a full file, and every message an operator can see."""

# The table of bad files keeps each case and its whole message on one line,
# so that a message reads as the operator will read it.
# ruff: noqa: E501

import dataclasses
import os
import pwd
import re
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path
from types import MappingProxyType

import pytest

from busd import config
from busd.config import (
    AccessConfig,
    BrokerConfig,
    Config,
    ConfigError,
    DaemonConfig,
    Restart,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
is_root = os.geteuid() == 0


def write(tmp_path: Path, text: str, name: str = "busd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    """The messages for ``text``, each checked to start with the file name."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    prefix = f"{path}: "
    assert all(line.startswith(prefix) for line in info.value.errors)
    assert str(info.value) == "\n".join(info.value.errors)
    return [line.removeprefix(prefix) for line in info.value.errors]


ORDERS = '[brokers.orders]\nhandler = "examples.stock:Broker"\n'


# -- defaults and valid files -------------------------------------------------


def test_defaults():
    c = Config()
    assert c.busd.socket == "/run/busd/busd.sock"
    assert c.busd.socket_mode == 0o660
    assert c.busd.group == ""
    assert c.busd.pidfile == "/run/busd/busd.pid"
    assert c.busd.user == ""
    assert c.busd.umask == 0o022
    assert c.busd.log_level == "info"
    assert c.busd.max_frame == 1048576
    assert c.busd.max_clients == 1024
    assert c.busd.strict_channels is False
    assert c.access == AccessConfig((), (), (), ())
    assert dict(c.brokers) == {}
    b = BrokerConfig("x", handler="m:C")
    assert b.channels == ("main",)
    assert (b.instances, b.restart, b.stop_timeout) == (1, Restart.ON_FAILURE, 10.0)
    assert (dict(b.env), b.cwd, b.user) == ({}, "", "")
    assert (b.max_inflight, b.queue_size, b.max_retries) == (64, 10000, 3)


def test_missing_file_at_default_path_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "nope" / "busd.toml"))
    c = load_config()
    assert c == Config()
    assert c.source is None


def test_missing_file_named_explicitly_is_an_error(tmp_path):
    path = tmp_path / "busd.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: cannot read the config file: No such file or directory"
    )


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path, "")
    c = load_config(str(path))
    assert c == Config()
    assert c.source == str(path)


FULL = """
[busd]
socket = "/run/b/b.sock"
socket_mode = "0600"
group = "busd"
pidfile = "/run/b/b.pid"
user = 998
umask = "027"
log_level = "debug"
max_frame = 1024
max_clients = 5
strict_channels = true

[access]
read_users = ["alice", 1001]
read_groups = ["adm"]
write_users = ["bob"]
write_groups = [0, "wheel"]

[brokers.orders]
handler = "examples.stock:Broker"
channels = ["main", "orders.new"]
instances = 256
restart = "always"
stop_timeout = 2.5
env = { LANG = "C.UTF-8", "MY VAR" = "" }
cwd = "/srv/orders"
user = "orders"
max_inflight = 1
queue_size = 1
max_retries = 0
start_retries = 0
backoff_max = 2
backoff_reset = 0.5

[brokers.audit-log_2]
command = ["/usr/bin/audit", "--json"]
channels = ["dead"]
restart = "never"
stop_timeout = 3
"""


def test_full_file_round_trips_into_the_dataclasses(tmp_path):
    path = write(tmp_path, FULL)
    c = load_config(path)
    assert c == Config(
        busd=DaemonConfig(
            socket="/run/b/b.sock",
            socket_mode=0o600,
            group="busd",
            pidfile="/run/b/b.pid",
            user=998,
            umask=0o027,
            log_level="debug",
            max_frame=1024,
            max_clients=5,
            strict_channels=True,
        ),
        access=AccessConfig(
            read_users=("alice", 1001),
            read_groups=("adm",),
            write_users=("bob",),
            write_groups=(0, "wheel"),
        ),
        brokers={
            "orders": BrokerConfig(
                name="orders",
                handler="examples.stock:Broker",
                channels=("main", "orders.new"),
                instances=256,
                restart=Restart.ALWAYS,
                stop_timeout=2.5,
                env={"LANG": "C.UTF-8", "MY VAR": ""},
                cwd="/srv/orders",
                user="orders",
                max_inflight=1,
                queue_size=1,
                max_retries=0,
                start_retries=0,
                backoff_max=2.0,
                backoff_reset=0.5,
            ),
            "audit-log_2": BrokerConfig(
                name="audit-log_2",
                command=("/usr/bin/audit", "--json"),
                channels=("dead",),
                restart=Restart.NEVER,
                stop_timeout=3.0,
            ),
        },
    )
    assert c.source == str(path)
    assert list(c.brokers) == ["orders", "audit-log_2"]  # file order
    audit = c.brokers["audit-log_2"]
    assert audit.handler is None
    assert isinstance(audit.stop_timeout, float)
    assert audit.restart == "never"  # a StrEnum compares to its text
    assert audit.start_retries is None  # absent: retried for ever
    assert isinstance(c.brokers["orders"].backoff_max, float)


def test_config_is_immutable(tmp_path):
    c = load_config(write(tmp_path, FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.busd.socket = "/tmp/x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.brokers["new"] = c.brokers["orders"]  # type: ignore[index]
    with pytest.raises(TypeError):
        c.brokers["orders"].env["X"] = "y"  # type: ignore[index]
    assert isinstance(c.brokers, MappingProxyType)
    # Overrides (the demo's socket path) go through dataclasses.replace.
    moved = dataclasses.replace(c, busd=dataclasses.replace(c.busd, socket="/tmp/s"))
    assert moved.busd.socket == "/tmp/s"
    assert c.busd.socket == "/run/b/b.sock"


def test_parse_config_takes_a_dict_and_names_the_source():
    c = parse_config({"busd": {"log_level": "error"}}, "<test>")
    assert c.busd.log_level == "error"
    assert c.source == "<test>"
    with pytest.raises(ConfigError) as info:
        parse_config({"busd": {"log_level": "loud"}}, "<test>")
    assert str(info.value).startswith("<test>: [busd] log_level: ")


def test_handlers_are_not_imported_nor_users_resolved(tmp_path):
    path = write(
        tmp_path,
        '[busd]\nuser = "no-such-user-here"\ngroup = 4242424\n'
        '[brokers.x]\nhandler = "no_such_module_for_busd:Broker"\n',
    )
    c = load_config(path)
    assert c.brokers["x"].handler == "no_such_module_for_busd:Broker"
    assert "no_such_module_for_busd" not in sys.modules
    assert (c.busd.user, c.busd.group) == ("no-such-user-here", 4242424)


def test_equality_ignores_the_source():
    data = {"busd": {"umask": "077"}}
    assert parse_config(data, "a.toml") == parse_config(data, "b.toml")


def test_the_example_config_loads_cleanly():
    # The checkout's ownership is not the point here (see the root tests).
    c = load_config(ROOT / "etc" / "busd.toml", check_permissions=False)
    assert c.busd.socket == "/run/busd/busd.sock"
    assert c.busd.pidfile == "/run/busd/busd.pid"
    assert list(c.brokers) == ["orders"]
    orders = c.brokers["orders"]
    assert orders.handler == "examples.stock:OrderBroker"
    assert orders.cwd == ".."
    assert orders.command is None
    assert orders.channels == ("main",)
    assert orders.instances == 2


# -- errors: the text is what an operator reads ------------------------------

BAD = [
    # unknown keys and tables, with suggestions
    (ORDERS + "instance = 2\n", ["[brokers.orders] unknown key \"instance\" (did you mean \"instances\"?)"]),
    ('[busd]\nzzz = 1\n', ['[busd] unknown key "zzz"']),
    ("[brokr]\n", ["unknown table [brokr] (did you mean [brokers]?)"]),
    ("[extra.deep]\n", ["unknown table [extra]"]),
    ('socket = "/x"\n', ['unknown key "socket" at the top level (it belongs in [busd])']),
    ("busd = 3\n", ["busd: expected a table [busd], got 3"]),
    ("[brokers]\norders = 3\n", ["[brokers] orders: expected a table [brokers.orders], got 3"]),
    # wrong types
    ("[busd]\nsocket = 5\n", ["[busd] socket: expected an absolute path of at most 107 bytes (the limit for a Unix socket), got 5"]),
    ('[busd]\nsocket = "run/busd.sock"\n', ['[busd] socket: expected an absolute path of at most 107 bytes (the limit for a Unix socket), got "run/busd.sock"']),
    ('[busd]\nsocket = "/' + "s" * 107 + '"\n', ['[busd] socket: expected an absolute path of at most 107 bytes (the limit for a Unix socket), got "/' + "s" * 54 + '..."']),
    ('[busd]\npidfile = ""\n', ['[busd] pidfile: expected an absolute path, got ""']),
    ('[busd]\nstrict_channels = "yes"\n', ['[busd] strict_channels: expected true or false, got "yes"']),
    ('[busd]\nmax_clients = "10"\n', ['[busd] max_clients: expected an integer >= 1, got "10"']),
    ("[busd]\nmax_clients = 1.5\n", ["[busd] max_clients: expected an integer >= 1, got 1.5"]),
    ('[access]\nread_users = "alice"\n', ['[access] read_users: expected a list of user names or uids, got "alice"']),
    ('[access]\nwrite_groups = ["ok", ""]\n', ['[access] write_groups[1]: expected a group name or gid, got ""']),
    ('[access]\nread_users = ["a b"]\n', ['[access] read_users[0]: expected a user name or uid, got "a b"']),
    ("[access]\nread_users = [-1]\n", ["[access] read_users[0]: expected a user name or uid, got -1"]),
    ("[busd]\nuser = 1.0\n", ['[busd] user: expected a user name or uid, or "" for stay, got 1.0']),
    ("[busd]\ngroup = []\n", ['[busd] group: expected a group name or gid, or "" for busd\'s own gid, got []']),
    (ORDERS + 'env = { PORT = 8080 }\n', ["[brokers.orders] env.PORT: expected a string, got 8080"]),
    (ORDERS + 'env = "A=B"\n', ['[brokers.orders] env: expected a table of strings like { LANG = "C.UTF-8" }, got "A=B"']),
    (ORDERS + 'env = { "A=B" = "c" }\n', ["[brokers.orders] env: expected variable names (non-empty, without '='), got \"A=B\""]),
    (ORDERS + "cwd = 1\n", ["[brokers.orders] cwd: expected a string, got 1"]),
    # booleans are not integers
    ("[busd]\nmax_frame = true\n", ["[busd] max_frame: expected an integer from 1024 to 4294967295, got true"]),
    (ORDERS + "instances = true\n", ["[brokers.orders] instances: expected an integer from 1 to 256, got true"]),
    (ORDERS + "max_retries = false\n", ["[brokers.orders] max_retries: expected an integer >= 0, got false"]),
    (ORDERS + "stop_timeout = true\n", ["[brokers.orders] stop_timeout: expected a number of seconds > 0, got true"]),
    ("[busd]\nuser = true\n", ['[busd] user: expected a user name or uid, or "" for stay, got true']),
    # octal strings
    ('[busd]\nsocket_mode = "abc"\n', ['[busd] socket_mode: expected an octal string like "0660", got "abc"']),
    ('[busd]\nsocket_mode = "0668"\n', ['[busd] socket_mode: expected an octal string like "0660", got "0668"']),
    ('[busd]\nsocket_mode = "1777"\n', ['[busd] socket_mode: expected an octal string like "0660", got "1777"']),
    ("[busd]\nsocket_mode = 660\n", ['[busd] socket_mode: expected an octal string like "0660", got 660 (a number: put the octal digits in quotes)']),
    ('[busd]\numask = ""\n', ['[busd] umask: expected an octal string like "022", got ""']),
    # enums
    ('[busd]\nlog_level = "INFO"\n', ['[busd] log_level: expected one of "debug", "info", "warning" or "error", got "INFO"']),
    (ORDERS + 'restart = "on_failure"\n', ['[brokers.orders] restart: expected one of "always", "on-failure" or "never", got "on_failure"']),
    (ORDERS + "restart = 1\n", ['[brokers.orders] restart: expected one of "always", "on-failure" or "never", got 1']),
    # handler and command
    (ORDERS + 'command = ["x"]\n', ["[brokers.orders] handler, command: expected exactly one of them, got both"]),
    ('[brokers.orders]\nchannels = ["main"]\n', ["[brokers.orders] handler, command: expected exactly one of them, got neither"]),
    ('[brokers.orders]\nhandler = "examples.stock"\n', ['[brokers.orders] handler: expected a "module:Class" string like "examples.stock:Broker", got "examples.stock"']),
    ('[brokers.orders]\nhandler = "examples.stock:"\n', ['[brokers.orders] handler: expected a "module:Class" string like "examples.stock:Broker", got "examples.stock:"']),
    ('[brokers.orders]\nhandler = "my-mod:Broker"\n', ['[brokers.orders] handler: expected a "module:Class" string like "examples.stock:Broker", got "my-mod:Broker"']),
    ("[brokers.orders]\ncommand = []\n", ['[brokers.orders] command: expected a non-empty list of strings like ["prog", "arg"], got []']),
    ('[brokers.orders]\ncommand = "prog arg"\n', ['[brokers.orders] command: expected a non-empty list of strings like ["prog", "arg"], got "prog arg"']),
    ('[brokers.orders]\ncommand = ["", "arg"]\n', ['[brokers.orders] command[0]: expected a program name, got ""']),
    ('[brokers.orders]\ncommand = ["prog", 1]\n', ["[brokers.orders] command[1]: expected a string, got 1"]),
    # broker names
    ('[brokers."my orders"]\nhandler = "m:C"\n', ["[brokers.\"my orders\"]: expected a broker name of 1 to 64 letters, digits, '-' or '_', got \"my orders\""]),
    ('[brokers.' + "a" * 65 + ']\nhandler = "m:C"\n', ["[brokers." + "a" * 65 + "]: expected a broker name of 1 to 64 letters, digits, '-' or '_', got \"" + "a" * 55 + '..."']),
    # channels
    (ORDERS + "channels = []\n", ["[brokers.orders] channels: expected a non-empty list of channel names, got []"]),
    (ORDERS + 'channels = "main"\n', ['[brokers.orders] channels: expected a non-empty list of channel names, got "main"']),
    (ORDERS + 'channels = ["main", "a b"]\n', ["[brokers.orders] channels[1]: expected a channel name of 1 to 64 letters, digits, '-', '_' or '.', got \"a b\""]),
    (ORDERS + 'channels = ["main", "main"]\n', ['[brokers.orders] channels[1]: expected no repeats, got "main" again']),
    # out-of-range numbers
    ("[busd]\nmax_frame = 1023\n", ["[busd] max_frame: expected an integer from 1024 to 4294967295, got 1023"]),
    ("[busd]\nmax_clients = 0\n", ["[busd] max_clients: expected an integer >= 1, got 0"]),
    (ORDERS + "instances = 0\n", ["[brokers.orders] instances: expected an integer from 1 to 256, got 0"]),
    (ORDERS + "instances = 257\n", ["[brokers.orders] instances: expected an integer from 1 to 256, got 257"]),
    (ORDERS + "stop_timeout = 0\n", ["[brokers.orders] stop_timeout: expected a number of seconds > 0, got 0"]),
    (ORDERS + "stop_timeout = -1.5\n", ["[brokers.orders] stop_timeout: expected a number of seconds > 0, got -1.5"]),
    (ORDERS + "stop_timeout = inf\n", ["[brokers.orders] stop_timeout: expected a number of seconds > 0, got inf"]),
    (ORDERS + "stop_timeout = nan\n", ["[brokers.orders] stop_timeout: expected a number of seconds > 0, got nan"]),
    (ORDERS + "max_inflight = 0\n", ["[brokers.orders] max_inflight: expected an integer >= 1, got 0"]),
    (ORDERS + "queue_size = 0\n", ["[brokers.orders] queue_size: expected an integer >= 1, got 0"]),
    (ORDERS + "max_retries = -1\n", ["[brokers.orders] max_retries: expected an integer >= 0, got -1"]),
    # the restart backoff
    (ORDERS + "start_retries = -1\n", ["[brokers.orders] start_retries: expected an integer >= 0, got -1"]),
    (ORDERS + "start_retries = true\n", ["[brokers.orders] start_retries: expected an integer >= 0, got true"]),
    (ORDERS + "start_retries = 2.5\n", ["[brokers.orders] start_retries: expected an integer >= 0, got 2.5"]),
    (ORDERS + 'start_retries = "5"\n', ['[brokers.orders] start_retries: expected an integer >= 0, got "5"']),
    (ORDERS + "backoff_max = 0\n", ["[brokers.orders] backoff_max: expected a number of seconds > 0, got 0"]),
    (ORDERS + "backoff_max = inf\n", ["[brokers.orders] backoff_max: expected a number of seconds > 0, got inf"]),
    (ORDERS + 'backoff_max = "30s"\n', ['[brokers.orders] backoff_max: expected a number of seconds > 0, got "30s"']),
    (ORDERS + "backoff_reset = -10\n", ["[brokers.orders] backoff_reset: expected a number of seconds > 0, got -10"]),
    (ORDERS + "backoff = 5\n", ['[brokers.orders] unknown key "backoff" (did you mean "backoff_max"?)']),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_error_messages(tmp_path, text, expected):
    assert errors_of(tmp_path, text) == expected


def test_every_problem_is_reported_at_once_in_file_order(tmp_path):
    text = (
        '[busd]\nsocket_mode = "abc"\nmax_clients = true\n'
        "[brokr]\n"
        '[brokers.orders]\ninstance = 2\nhandler = "m:C"\n'
    )
    assert errors_of(tmp_path, text) == [
        '[busd] socket_mode: expected an octal string like "0660", got "abc"',
        "[busd] max_clients: expected an integer >= 1, got true",
        "unknown table [brokr] (did you mean [brokers]?)",
        '[brokers.orders] unknown key "instance" (did you mean "instances"?)',
    ]


def test_syntax_error_gives_line_and_column(tmp_path):
    text = '[busd]\nsocket = "/run/x"\nlog_level = loud\n'
    assert errors_of(tmp_path, text) == [
        "TOML syntax error: Invalid value (at line 3, column 13)"
    ]
    assert errors_of(tmp_path, "[busd\n") == [
        "TOML syntax error: Expected ']' at the end of a table declaration"
        " (at line 1, column 6)"
    ]


def test_duplicate_key_is_a_syntax_error(tmp_path):
    text = "[busd]\nmax_clients = 1\nmax_clients = 2\n"
    (line,) = errors_of(tmp_path, text)
    assert line == "TOML syntax error: Cannot overwrite a value (at line 3, column 16)"


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "busd.toml"
    path.write_bytes(b'[busd]\nuser = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 15): invalid start byte"


def test_directory_instead_of_a_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read the config file: Is a directory"


# -- permissions --------------------------------------------------------------


def _load_as_nobody(path: Path) -> str:
    """Run load_config(path) in a child that became ``nobody``; its outcome."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                load_config(path)
                outcome = "loaded"
            except ConfigError as exc:
                outcome = str(exc)
            os.write(write_end, outcome.encode())
        except BaseException as exc:
            os.write(write_end, f"child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


@pytest.mark.skipif(not is_root, reason="needs root to become nobody")
def test_unreadable_file_as_an_unprivileged_user():
    # A directory nobody may enter, holding a file only root may read.
    directory = Path(tempfile.mkdtemp())
    try:
        directory.chmod(0o755)
        path = write(directory, "[busd]\n")
        path.chmod(0o600)
        assert _load_as_nobody(path) == (
            f"{path}: cannot read the config file: Permission denied"
        )
        path.chmod(0o644)
        assert _load_as_nobody(path) == "loaded"  # the check is root-only
    finally:
        shutil.rmtree(directory)


@pytest.mark.skipif(not is_root, reason="the check only applies to root")
@pytest.mark.parametrize(
    ("mode", "who"), [(0o666, "others"), (0o646, "others"), (0o664, "its group")]
)
def test_root_refuses_a_file_writable_by_others(tmp_path, mode, who):
    path = write(tmp_path, ORDERS)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: refusing a config file writable by {who} "
        f"(mode {mode:04o}); chmod go-w it"
    )
    assert load_config(path, check_permissions=False).brokers["orders"]


@pytest.mark.skipif(not is_root, reason="needs root to chown")
def test_root_refuses_a_file_not_owned_by_root(tmp_path):
    path = write(tmp_path, ORDERS)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: refusing a config file owned by uid {nobody.pw_uid}, "
        "not root; chown root it"
    )
    path.chmod(0o666)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.errors) == 2  # both problems, one line each
    assert load_config(path, check_permissions=False).brokers["orders"]


def test_permission_check_runs_only_as_root(tmp_path, monkeypatch):
    path = write(tmp_path, ORDERS)
    path.chmod(0o666)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert load_config(path).brokers["orders"]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (
        f"{path}: refusing a config file writable by others (mode 0666); chmod go-w it"
        in info.value.errors
    )


def test_the_examples_in_the_documentation_load_cleanly():
    text = (ROOT / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    assert blocks
    for block in blocks:
        c = parse_config(tomllib.loads(block), "docs/configuration.md")
        assert c.brokers


def test_the_documented_keys_and_defaults_match_the_code():
    text = (ROOT / "docs" / "configuration.md").read_text()
    sections = {
        "busd": (DaemonConfig(), lambda kv: {"busd": kv}, lambda c: c.busd),
        "access": (AccessConfig(), lambda kv: {"access": kv}, lambda c: c.access),
        "brokers.NAME": (
            BrokerConfig("x", handler="m:C"),
            lambda kv: {"brokers": {"x": {"handler": "m:C", **kv}}},
            lambda c: c.brokers["x"],
        ),
    }
    for table, (defaults, wrap, pick) in sections.items():
        body = text.split(f"## `[{table}]`")[1].split("\n## ")[0]
        rows = re.findall(r"^\| `(\w+)` \| (`[^|]*`|—) \|", body, re.MULTILINE)
        documented = {key for key, _ in rows}
        fields = {f.name for f in dataclasses.fields(defaults)} - {"name"}
        assert documented == fields, table
        for key, literal in rows:
            if literal == "—":
                continue
            value = tomllib.loads(f"v = {literal.strip('`')}")["v"]
            parsed = pick(parse_config(wrap({key: value}), "docs"))
            assert getattr(parsed, key) == getattr(defaults, key), (table, key)
