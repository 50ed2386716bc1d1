"""The daemon's configuration: one TOML file read into frozen dataclasses.

The file (default ``/etc/busd/busd.toml``) has three tables, every key
optional::

    [busd]            the daemon itself: socket, PID file, privileges, limits
    [access]          who may use the control socket
    [brokers.NAME]    one table per broker (a pool of worker processes)

:func:`load_config` reads the file and :func:`parse_config` checks the
parsed TOML. Checking is complete rather than fail-fast: every problem in
the file is collected and raised together as one :class:`ConfigError`, one
line each, so an operator fixes the file in one pass. Each line names the
file, the table and the key, and says what was expected and what was found,
because that line is all an operator sees when a reload is refused.

Checking has no side effects on purpose: user and group names are not
looked up and broker handlers are not imported. The daemon does both when
it acts on the config (after deciding on privileges), so that validating a
new file on ``SIGHUP`` can never change the running process.

When busd runs as root, :func:`load_config` refuses a file that is not
owned by root or that group or others may write: such a file would let an
unprivileged user choose the commands root starts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from busd.protocol import CHANNEL_NAME_RULE, is_channel_name

__all__ = [
    "DEFAULT_PATH",
    "LOG_LEVELS",
    "AccessConfig",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "Restart",
    "load_config",
    "parse_config",
]

DEFAULT_PATH = "/etc/busd/busd.toml"

#: Accepted values of ``[busd] log_level``, most verbose first.
LOG_LEVELS = ("debug", "info", "warning", "error")

#: A user or group as written in the file: a name, or a numeric id.
Principal = str | int

# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_MAX_ID = 2**32 - 2  # uid_t/gid_t; (uid_t)-1 means "no change" to the kernel
_MAX_FRAME = 2**32 - 1  # the frame length prefix is 4 bytes
_BROKER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Restart(enum.StrEnum):
    """When the supervisor starts a broker instance again after it exits."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"  # only after a non-zero exit or a signal
    NEVER = "never"


def _frozen_map() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class DaemonConfig:
    """The ``[busd]`` table: the daemon process, its socket and its limits.

    ``socket_mode`` and ``umask`` hold the numbers the octal strings stand
    for (``"0660"`` becomes ``0o660``). ``user`` and ``group`` are names or
    numeric ids, not yet resolved; ``""`` means "busd's own".
    """

    socket: str = "/run/busd/busd.sock"
    socket_mode: int = 0o660
    group: Principal = ""
    pidfile: str = "/run/busd/busd.pid"
    user: Principal = ""
    umask: int = 0o022
    log_level: str = "info"
    max_frame: int = 1048576
    max_clients: int = 1024
    frame_timeout: float = 10.0
    max_output: int = 8388608
    strict_channels: bool = False
    spool: str = ""
    spool_fsync: str = "always"
    max_dead_letters: int = 10000


@dataclass(frozen=True)
class AccessConfig:
    """The ``[access]`` table: allow-lists for the control socket.

    Root and busd's own user are always allowed, and write access implies
    read access; the control server applies those rules, not this class.
    """

    read_users: tuple[Principal, ...] = ()
    read_groups: tuple[Principal, ...] = ()
    write_users: tuple[Principal, ...] = ()
    write_groups: tuple[Principal, ...] = ()


@dataclass(frozen=True)
class BrokerConfig:
    """One ``[brokers.NAME]`` table: a named pool of worker processes.

    Exactly one of ``handler`` (a ``"module:Class"`` run by busd's own
    worker) and ``command`` (an argv speaking the broker protocol) is set.
    """

    name: str
    handler: str | None = None
    command: tuple[str, ...] | None = None
    channels: tuple[str, ...] = ("main",)
    instances: int = 1
    restart: Restart = Restart.ON_FAILURE
    stop_timeout: float = 10.0
    env: Mapping[str, str] = field(default_factory=_frozen_map)
    cwd: str = ""
    user: Principal = ""
    max_inflight: int = 64
    queue_size: int = 10000
    max_retries: int = 3
    ack_timeout: float = 60.0
    #: Failed starts in a row allowed before FATAL; None: retry for ever.
    start_retries: int | None = None
    #: The longest wait between two starts (the backoff's cap), in seconds.
    backoff_max: float = 30.0
    #: RUNNING this long, a worker's exit starts a new series of failures.
    backoff_reset: float = 10.0


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``Config()`` is the built-in defaults.

    ``brokers`` maps names to their tables in file order. ``source`` is
    where the config came from (``None`` for the built-in defaults) and is
    left out of ``==``, so a reload can compare old and new by value.
    Overrides (the demo's socket path, say) use :func:`dataclasses.replace`.
    """

    busd: DaemonConfig = field(default_factory=DaemonConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    brokers: Mapping[str, BrokerConfig] = field(default_factory=_frozen_map)
    source: str | None = field(default=None, compare=False)


class ConfigError(Exception):
    """The config file can't be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: tuple[str, ...] = (
            (errors,) if isinstance(errors, str) else tuple(errors)
        )
        super().__init__("\n".join(self.errors))


def load_config(
    path: str | os.PathLike[str] | None = None, *, check_permissions: bool = True
) -> Config:
    """Read and check the config file at ``path`` (``None``: the default path).

    A file missing at the default path gives the defaults; a file named
    explicitly must exist. When running as root (and ``check_permissions``
    is true) the file must be owned by root and not writable by group or
    others. Raises :class:`ConfigError`.
    """
    filename = DEFAULT_PATH if path is None else os.fspath(path)
    try:
        with open(filename, "rb") as file:
            if check_permissions and os.geteuid() == 0:
                _refuse_unsafe(filename, os.fstat(file.fileno()))
            data = tomllib.load(file)
    except FileNotFoundError as exc:
        if path is None:
            return Config()
        raise ConfigError(
            f"{filename}: cannot read the config file: {exc.strerror}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{filename}: cannot read the config file: {exc.strerror}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{filename}: not UTF-8 text (byte {exc.start}): {exc.reason}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{filename}: TOML syntax error: {exc}") from None
    return parse_config(data, filename)


def _refuse_unsafe(filename: str, st: os.stat_result) -> None:
    errors = []
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        errors.append(
            f"{filename}: refusing a config file owned by uid {st.st_uid}, "
            "not root; chown root it"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if mode & stat.S_IWOTH else "its group"
        errors.append(
            f"{filename}: refusing a config file writable by {who} "
            f"(mode {mode:04o}); chmod go-w it"
        )
    if errors:
        raise ConfigError(errors)


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Check parsed TOML ``data`` and build a :class:`Config`.

    ``source`` names the file in error messages. Raises :class:`ConfigError`
    listing every problem found.
    """
    errors: list[str] = []
    sections: dict[str, Any] = {}
    parsers: dict[str, Callable[[_Table], Any]] = {
        "busd": _parse_daemon,
        "access": _parse_access,
        "brokers": _parse_brokers,
    }
    for key, value in data.items():
        if key in parsers:
            if isinstance(value, dict):
                sections[key] = parsers[key](_Table(source, key, value, errors))
            else:
                errors.append(
                    f"{source}: {key}: expected a table [{key}], got {_show(value)}"
                )
        elif isinstance(value, dict):
            hint = _did_you_mean(key, parsers, "[{}]")
            errors.append(f"{source}: unknown table [{_key(key)}]{hint}")
        else:
            home = [name for name, keys in _TOP_KEYS.items() if key in keys]
            hint = f" (it belongs in [{home[0]}])" if home else ""
            errors.append(f"{source}: unknown key {_show(key)} at the top level{hint}")
    if errors:
        raise ConfigError(errors)
    return Config(**sections, source=source)


# -- the tables --------------------------------------------------------------


def _parse_daemon(t: _Table) -> DaemonConfig:
    d = DaemonConfig()
    config = DaemonConfig(
        socket=t.get("socket", d.socket, _absolute_path(_MAX_SOCKET_PATH)),
        socket_mode=t.get("socket_mode", d.socket_mode, _octal("0660")),
        group=t.get("group", d.group, _principal("group", empty="busd's own gid")),
        pidfile=t.get("pidfile", d.pidfile, _absolute_path()),
        user=t.get("user", d.user, _principal("user", empty="stay")),
        umask=t.get("umask", d.umask, _octal("022")),
        log_level=t.get("log_level", d.log_level, _choice(LOG_LEVELS)),
        max_frame=t.get("max_frame", d.max_frame, _integer(1024, _MAX_FRAME)),
        max_clients=t.get("max_clients", d.max_clients, _integer(1)),
        frame_timeout=t.get("frame_timeout", d.frame_timeout, _seconds),
        max_output=t.get("max_output", d.max_output, _integer(65536)),
        strict_channels=t.get("strict_channels", d.strict_channels, _boolean),
        spool=t.get("spool", d.spool, _optional_absolute_path),
        spool_fsync=t.get(
            "spool_fsync", d.spool_fsync, _choice(("always", "interval", "never"))
        ),
        max_dead_letters=t.get("max_dead_letters", d.max_dead_letters, _integer(1)),
    )
    t.reject_unknown()
    return config


def _parse_access(t: _Table) -> AccessConfig:
    users = _list_of(_principal("user"), "user names or uids")
    groups = _list_of(_principal("group"), "group names or gids")
    config = AccessConfig(
        read_users=t.get("read_users", (), users),
        read_groups=t.get("read_groups", (), groups),
        write_users=t.get("write_users", (), users),
        write_groups=t.get("write_groups", (), groups),
    )
    t.reject_unknown()
    return config


def _parse_brokers(t: _Table) -> Mapping[str, BrokerConfig]:
    brokers = {}
    for name, body in t.data.items():
        table = f"brokers.{_key(name)}"
        if not isinstance(body, dict):
            t.error(f"{_key(name)}: expected a table [{table}], got {_show(body)}")
            continue
        broker = _Table(t.source, table, body, t.errors)
        if not _BROKER_NAME.fullmatch(name):
            broker.error(
                ": expected a broker name of 1 to 64 letters, digits, '-' or '_', "
                f"got {_show(name)}",
                sep="",
            )
        brokers[name] = _parse_broker(name, broker)
    return MappingProxyType(brokers)


def _parse_broker(name: str, t: _Table) -> BrokerConfig:
    d = BrokerConfig(name)
    config = BrokerConfig(
        name=name,
        handler=t.get("handler", None, _handler),
        command=t.get("command", None, _command),
        channels=t.get(
            "channels",
            d.channels,
            _list_of(_channel, "channel names", non_empty=True, unique=True),
        ),
        instances=t.get("instances", d.instances, _integer(1, 256)),
        restart=Restart(t.get("restart", d.restart, _choice(list(Restart)))),
        stop_timeout=t.get("stop_timeout", d.stop_timeout, _seconds),
        env=t.get("env", d.env, _env),
        cwd=t.get("cwd", d.cwd, _text),
        user=t.get("user", d.user, _principal("user", empty="busd's user")),
        max_inflight=t.get("max_inflight", d.max_inflight, _integer(1)),
        queue_size=t.get("queue_size", d.queue_size, _integer(1)),
        max_retries=t.get("max_retries", d.max_retries, _integer(0)),
        ack_timeout=t.get("ack_timeout", d.ack_timeout, _seconds_or_zero),
        start_retries=t.get("start_retries", d.start_retries, _integer(0)),
        backoff_max=t.get("backoff_max", d.backoff_max, _seconds),
        backoff_reset=t.get("backoff_reset", d.backoff_reset, _seconds),
    )
    present = [key for key in ("handler", "command") if key in t.data]
    if len(present) != 1:
        got = "both" if present else "neither"
        t.error(f"handler, command: expected exactly one of them, got {got}")
    t.reject_unknown()
    return config


# Where a key found at the top level probably belongs, for the hint.
_TOP_KEYS = {
    "busd": {f.name for f in dataclasses.fields(DaemonConfig)},
    "access": {f.name for f in dataclasses.fields(AccessConfig)},
}


class _Table:
    """One TOML table being checked: reads known keys, reports the rest."""

    def __init__(
        self, source: str, name: str, data: dict[str, Any], errors: list[str]
    ) -> None:
        self.source = source
        self.prefix = f"{source}: [{name}]"
        self.data = data
        self.errors = errors
        self.known: list[str] = []

    def get(self, key: str, default: Any, check: Callable[[Any], Any]) -> Any:
        """The checked value of ``key``, or ``default`` if absent or invalid."""
        self.known.append(key)
        if key not in self.data:
            return default
        try:
            return check(self.data[key])
        except _Invalid as bad:
            got = _show(bad.got) + bad.note
            self.error(f"{key}{bad.at}: expected {bad.expected}, got {got}")
            return default

    def error(self, text: str, sep: str = " ") -> None:
        self.errors.append(f"{self.prefix}{sep}{text}")

    def reject_unknown(self) -> None:
        for key in self.data:
            if key not in self.known:
                hint = _did_you_mean(key, self.known, '"{}"')
                self.error(f"unknown key {_show(key)}{hint}")


# -- value checks: each returns the value to store or raises _Invalid --------


class _Invalid(Exception):
    """A value failed its check; ``at`` locates it inside the key's value."""

    def __init__(
        self, expected: str, got: object, at: str = "", note: str = ""
    ) -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got
        self.at = at
        self.note = note


def _integer(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    expected = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def check(value: Any) -> int:
        # bool is a subclass of int: "instances = true" is a mistake.
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
        ):
            raise _Invalid(expected, value)
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false", value)
    return value


def _seconds_or_zero(value: Any) -> float:
    if value == 0 and not isinstance(value, bool):
        return 0.0
    try:
        return _seconds(value)
    except _Invalid:
        raise _Invalid("a number of seconds > 0, or 0 for none", value) from None


def _seconds(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise _Invalid("a number of seconds > 0", value)
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise _Invalid("a string", value)
    return value


def _octal(example: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"[0-7]{1,4}", value):
            number = int(value, 8)
            if number <= 0o777:
                return number
        # A bare 0660 is a TOML error and 660 is decimal: insist on quotes.
        note = " (a number: put the octal digits in quotes)"
        is_number = isinstance(value, int) and not isinstance(value, bool)
        raise _Invalid(f'an octal string like "{example}"', value, "", note * is_number)

    return check


def _choice(choices: Iterable[str]) -> Callable[[Any], str]:
    options = [str(choice) for choice in choices]
    quoted = [f'"{option}"' for option in options]
    expected = "one of " + ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise _Invalid(expected, value)
        return value

    return check


def _absolute_path(max_bytes: int | None = None) -> Callable[[Any], str]:
    expected = "an absolute path"
    if max_bytes is not None:
        expected += f" of at most {max_bytes} bytes (the limit for a Unix socket)"

    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise _Invalid(expected, value)
        if max_bytes is not None and len(os.fsencode(value)) > max_bytes:
            raise _Invalid(expected, value)
        return value

    return check


def _optional_absolute_path(value: Any) -> str:
    if value == "":
        return ""
    try:
        return _absolute_path()(value)
    except _Invalid:
        raise _Invalid('an absolute path, or "" for none', value) from None


def _principal(kind: str, empty: str | None = None) -> Callable[[Any], Principal]:
    """A user or group: a name (syntax only, not looked up) or a numeric id."""
    expected = f"a {kind} name or {kind[0]}id"
    if empty is not None:
        expected += f', or "" for {empty}'

    def check(value: Any) -> Principal:
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= _MAX_ID:
                return value
        elif isinstance(value, str):
            if value == "" and empty is not None:
                return value
            if value and not any(c.isspace() or c in ":\0" for c in value):
                return value
        raise _Invalid(expected, value)

    return check


def _list_of(
    item: Callable[[Any], Any],
    what: str,
    *,
    non_empty: bool = False,
    unique: bool = False,
) -> Callable[[Any], tuple[Any, ...]]:
    expected = f"a {'non-empty ' if non_empty else ''}list of {what}"

    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list) or (non_empty and not value):
            raise _Invalid(expected, value)
        items = []
        for index, element in enumerate(value):
            try:
                checked = item(element)
            except _Invalid as bad:
                raise _Invalid(bad.expected, bad.got, f"[{index}]") from None
            if unique and checked in items:
                raise _Invalid("no repeats", element, f"[{index}]", " again")
            items.append(checked)
        return tuple(items)

    return check


def _channel(value: Any) -> str:
    if not is_channel_name(value):
        raise _Invalid(f"a channel name of {CHANNEL_NAME_RULE}", value)
    return value


def _handler(value: Any) -> str:
    module, _, attr = value.partition(":") if isinstance(value, str) else ("", "", "")
    parts = [*module.split("."), *attr.split(".")]
    if not isinstance(value, str) or not all(part.isidentifier() for part in parts):
        raise _Invalid('a "module:Class" string like "examples.stock:Broker"', value)
    return value


def _command(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid('a non-empty list of strings like ["prog", "arg"]', value)
    for index, arg in enumerate(value):
        if not isinstance(arg, str) or "\0" in arg or (index == 0 and not arg):
            what = "a program name" if index == 0 else "a string"
            raise _Invalid(what, arg, f"[{index}]")
    return tuple(value)


def _env(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid('a table of strings like { LANG = "C.UTF-8" }', value)
    for name, text in value.items():
        if not name or "=" in name or "\0" in name:
            raise _Invalid("variable names (non-empty, without '=')", name)
        if not isinstance(text, str) or "\0" in text:
            raise _Invalid("a string", text, f".{_key(name)}")
    return MappingProxyType(dict(value))


# -- message helpers ---------------------------------------------------------
# (json and difflib are imported where they are used: only messages about a
# broken config need them, and busd's start is on the clock.)


def _key(name: str) -> str:
    """``name`` as TOML writes it in a dotted key: bare if it can be."""
    if _BARE_KEY.fullmatch(name):
        return name
    import json

    return json.dumps(name, ensure_ascii=False)


def _show(value: Any, limit: int = 60) -> str:
    """``value`` as it looks in TOML, shortened for a one-line message."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        import json

        short = value if len(value) <= limit else value[: limit - 5] + "..."
        return json.dumps(short, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(item, limit) for item in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _did_you_mean(word: str, options: Iterable[str], form: str) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {form.format(close[0])}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Settings given on the command line; they win over the file, also on
    reload."""

    socket: str | None = None
    pidfile: str | None = None
    log_level: str | None = None

    def apply(self, config: Config) -> Config:
        """``config`` with these overrides in place (paths made absolute)."""
        changes = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        for key in ("socket", "pidfile"):
            if key in changes:
                changes[key] = os.path.abspath(changes[key])
        if not changes:
            return config
        return dataclasses.replace(
            config, busd=dataclasses.replace(config.busd, **changes)
        )
