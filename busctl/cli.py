"""The ``busctl`` command: talk to busd over its control socket.

Exit statuses (sysexits.h): 0 ok, 1 other error, 3 ``state``: busd is
degraded (as ``systemctl status`` says 3 for a unit not running), 64 usage,
69 busd not running (or, for ``publish --wait``, no instance of a broker on
the channel can run), 75 busy or timed out (try again), 77 permission
denied, 78 reload refused (broken config file). Errors go to stderr as one
line that says what to do.

Imports are lazy: ``busctl ping`` loads the client and msgpack, never the
daemon or asyncio, so the command starts quickly. The commands that take no
argument of their own (``busctl --socket PATH ping``, ``busctl --json
state``) do not even load argparse: see :func:`_parse_simple`.
"""

from __future__ import annotations

import sys
import types

from busctl.output import (
    EX_CONFIG,
    EX_DEGRADED,
    EX_ERROR,
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    fail,
    show,
)
from busd._version import __version__

# typing costs busctl's start-up about 3 ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

    from busctl.client import Client


EXIT_STATUS = """\
exit status: 0 ok, 1 error, 3 degraded (state), 64 usage, 69 busd not
running (publish --wait: no instance of a broker on the channel can run),
75 busy or timed out, 77 permission denied, 78 broken config (reload)."""

EPILOG = f"""\
examples:
  busctl state
  busctl publish main "BUY ABCD 10"
  busctl publish --json-message orders '{{"code": "ABCD", "n": 10}}'
  busctl publish --wait main "BUY ABCD 10"
  printf 'BUY ABCD 10\\nSELL EFGH 5\\n' | busctl publish main -
  busctl subscribe main
  busctl logs -f
  busctl restart orders:1
  busctl scale orders 4
  busctl dead replay --all

The socket is --socket, else $BUSD_SOCKET, else /run/busd/busd.sock.
{EXIT_STATUS}
"""

# Each command's --help ends with its own examples and the exit statuses.
EXAMPLES = {
    "ping": ["busctl ping"],
    "state": ["busctl state", "busctl --json state"],
    "publish": [
        'busctl publish main "BUY ABCD 10"',
        'busctl publish --json-message orders \'{"code": "ABCD", "n": 10}\'',
        "printf 'BUY ABCD 10\\nSELL EFGH 5\\n' | busctl publish main -",
        'busctl publish --wait main "BUY ABCD 10"',
        'busctl --timeout 60 publish --wait main "BUY ABCD 10"',
    ],
    "subscribe": ["busctl subscribe main", "busctl --json subscribe main audit"],
    "events": ["busctl events"],
    "logs": ["busctl logs -n 20", "busctl logs -f"],
    "start": ["busctl start orders", "busctl start orders:1"],
    "stop": ["busctl stop orders:1", "busctl stop orders"],
    "restart": [
        "busctl restart orders",
        "busctl restart orders:0",
        "busctl --json restart orders:0",
    ],
    "scale": ["busctl scale orders 4", "busctl --timeout 60 scale orders 16"],
    "reload": ["busctl reload"],
    "shutdown": [
        "busctl shutdown",
        "busctl shutdown --wait",
        "busctl --timeout 60 shutdown --wait && busd start",
    ],
    "dead": [
        "busctl dead",
        "busctl dead show 3",
        "busctl dead replay 3 4",
        "busctl dead replay --all",
        "busctl dead drop --all",
        "busctl --json dead list",
    ],
}


DEFAULT_TIMEOUT = 10.0


class UsageError(Exception):
    """The command line asks for something impossible (exit status 64)."""


def _positive_seconds(text: str) -> float | None:
    """``text`` as a number of seconds, or None unless it is positive and finite."""
    try:
        value = float(text)
    except ValueError:
        return None
    # nan and inf would reach socket.settimeout() and raise there.
    return value if 0 < value < float("inf") else None


def _seconds(text: str) -> float:
    value = _positive_seconds(text)
    if value is None:
        import argparse  # loaded already: only argparse calls this

        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, got {text!r}"
        )
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        import argparse  # loaded already: only argparse calls this

        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _letter_id(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        import argparse  # loaded already: only argparse calls this

        raise argparse.ArgumentTypeError(
            f"expected a dead letter's ID (a whole number > 0, from `busctl dead "
            f"list`), got {text!r}"
        )
    return int(text)


def _target(text: str) -> tuple[str, int | None]:
    """``BROKER`` or ``BROKER:N`` as (name, index or None)."""
    name, colon, index = text.partition(":")
    if not name or (colon and not (index.isascii() and index.isdigit())):
        import argparse  # loaded already: only argparse calls this

        raise argparse.ArgumentTypeError(
            f"expected BROKER or BROKER:N (N an instance number, 0 for the "
            f"first), got {text!r}"
        )
    return name, int(index) if colon else None


def _epilog(command: str) -> str:
    lines = "\n".join(f"  {example}" for example in EXAMPLES[command])
    return f"examples:\n{lines}\n\n{EXIT_STATUS}\n"


# start, stop, restart: (command, help, description).
LIFECYCLE = [
    (
        "start",
        "start a broker's stopped instances, or instance N",
        "Start instance N of BROKER, or each of its instances that is not running\n"
        "(stopped, waiting in BACKOFF, or FATAL after too many failed starts),\n"
        "at once and with a new count of failed starts, and wait until they are\n"
        "RUNNING or have failed. Exit status 1 if one is not RUNNING then.",
    ),
    (
        "stop",
        "stop a broker's instances, or instance N",
        "Stop instance N of BROKER, or all of them: ask the worker, then SIGTERM,\n"
        "then SIGKILL after the broker's stop_timeout. What it had not\n"
        "acknowledged goes to the other instances. It stays stopped until\n"
        "`busctl start` or `restart`.",
    ),
    (
        "restart",
        "restart a broker's instances one by one, or instance N",
        "Stop and start instance N of BROKER, or each of its instances in turn\n"
        "(the others keep taking messages), and wait until they are RUNNING or\n"
        "have failed. Exit status 1 if one is not RUNNING then.",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, shared by ``main`` and the docs."""
    # Imported here, not at the top: the common commands never need it.
    import argparse

    class _Parser(argparse.ArgumentParser):
        """argparse, but a usage error is one line on stderr and exit status 64.

        Plain argparse prints the whole usage and exits 2, which sysexits
        calls nothing in particular; scripts calling busctl test for 64.
        """

        def error(self, message: str) -> NoReturn:
            self.exit(EX_USAGE, f"{self.prog}: {message}; see `{self.prog} --help`\n")

    parser = _Parser(
        prog="busctl",
        description="Control and query the busd process bus daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"busctl {__version__}")
    parser.add_argument("--socket", metavar="PATH", help="busd's control socket")
    parser.add_argument(
        "--json", action="store_true", help="print results as JSON (one per line)"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for each answer (default: 10)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )

    command("ping", help="check that busd answers")
    command(
        "state",
        help="bus state, health, process figures, brokers",
        description="Show busd's state: its health, process figures, and each\n"
        "broker's instances. Exit status 0 when healthy (every instance that\n"
        "should run is RUNNING), 3 when degraded (the Health: line says which\n"
        "instances are not), also with --json.",
    )
    publish = command(
        "publish",
        help="publish a message on a channel",
        description="Publish MESSAGE on CHANNEL. With MESSAGE '-', publish each\n"
        "line of standard input as one message, pipelined.",
    )
    publish.add_argument("channel", metavar="CHANNEL", help="the channel's name")
    publish.add_argument(
        "message", metavar="MESSAGE", help="the message, or - for standard input"
    )
    publish.add_argument(
        "--json-message",
        action="store_true",
        help="MESSAGE (or each input line) is JSON: publish the structured value",
    )
    publish.add_argument(
        "--wait",
        action="store_true",
        help="wait until every broker on CHANNEL acked the message or sent it to "
        "the dead channel; print the counts; exit 1 if it went dead. Refused "
        "at once (exit 69, nothing accepted) when a broker on CHANNEL has no "
        "instance that can run (all FATAL or stopped). A slow broker may need "
        "a longer --timeout (an option of busctl, before the command)",
    )
    subscribe = command(
        "subscribe", help="print messages published on channels until Ctrl-C"
    )
    subscribe.add_argument(
        "channels", metavar="CHANNEL", nargs="+", help="channels to print"
    )
    command("events", help="print bus and broker state changes")
    logs = command("logs", help="recent log lines; -f to follow")
    logs.add_argument("source", metavar="SOURCE", nargs="?", help="only this source")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines"
    )
    logs.add_argument(
        "-n", "--lines", type=_count, default=50, metavar="N", help="lines (default 50)"
    )
    for name, help_text, description in LIFECYCLE:
        lifecycle = command(name, help=help_text, description=description)
        lifecycle.add_argument(
            "target",
            metavar="BROKER[:N]",
            type=_target,
            help="a broker, or its instance N (from 0)",
        )
    scale = command(
        "scale",
        help="run N instances of a broker",
        description="Start instances or stop the highest-numbered ones until "
        "BROKER runs N of them\n(0 to 256), and wait until the new ones are "
        "RUNNING or have failed.\nThe config file is unchanged: busd goes back "
        "to its `instances` when it\nrestarts, or when a reload changes the "
        "broker's table. Starting many\ninstances may need a longer --timeout.",
    )
    scale.add_argument("broker", metavar="BROKER", help="the broker's name")
    scale.add_argument(
        "instances", metavar="N", type=_count, help="how many instances to run"
    )
    command("reload", help="reload the configuration (like SIGHUP)")
    shutdown = command(
        "shutdown",
        help="stop busd",
        description="Ask busd to stop. With --wait, return once its process has "
        "exited: exit\nstatus 0 then, 75 if it still runs after --timeout "
        "seconds (an option of\nbusctl, before the command; brokers with a "
        "long stop_timeout need more).",
    )
    shutdown.add_argument(
        "--wait",
        action="store_true",
        help="wait until busd's process has exited (at most --timeout seconds)",
    )
    dead = command(
        "dead",
        help="list, show, replay or drop dead letters",
        description="Messages a broker gave up on (max_retries, ack_timeout, or "
        "its broker\nremoved from the config) wait in busd's dead-letter store "
        "until you act.\nWithout an action: list them. `replay` publishes each "
        "message again on\nits channel, as a new message to every broker "
        "there; one refused (a\nbusy broker: exit 75; no broker on the "
        "channel: exit 1) stays stored.\n`drop` removes them for good.",
    )
    actions = dead.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="every dead letter in short (the default)")
    show = actions.add_parser("show", help="one dead letter whole")
    show.add_argument("id", metavar="ID", type=_letter_id, help="its ID")
    for name, help_text in (
        ("replay", "publish dead letters again on their channels"),
        ("drop", "remove dead letters for good"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument(
            "ids", metavar="ID", nargs="*", type=_letter_id, help="letters' IDs"
        )
        action.add_argument("--all", action="store_true", help="every dead letter")
    return parser


# The commands that take no argument of their own, and the global options
# that take a value: what _parse_simple understands.
SIMPLE_COMMANDS = frozenset({"ping", "state", "events", "reload", "shutdown"})
VALUE_OPTIONS = frozenset({"--socket", "--timeout"})


def _parse_simple(argv: list[str]) -> Any:
    """The arguments of a common command line, parsed without argparse; or None.

    Why: importing argparse and building the parser (twelve subparsers,
    their help formatters) takes about 10 ms, a third of what ``busctl
    ping`` costs beyond a bare Python. So the command lines people and
    scripts run most are read here: global options spelled in full
    (``--socket PATH`` or ``--socket=PATH``, ``--json``, ``--timeout
    SECONDS``), then one of SIMPLE_COMMANDS, last. Everything else, and
    anything unusual in that shape (``--help``, an abbreviated option, a
    value that is empty or starts with "-", a bad number of seconds, a
    word after the command), returns None, and argparse parses the line:
    its answer, error message or help is the same as always. The result
    has the attributes argparse would give: command, socket, json, timeout.
    """
    options: dict[str, Any] = {
        "socket": None,
        "json": False,
        "timeout": DEFAULT_TIMEOUT,
    }
    words = iter(argv)
    for word in words:
        if word in SIMPLE_COMMANDS:
            if next(words, None) is not None:
                return None  # an argument after the command: argparse says why
            return types.SimpleNamespace(command=word, **options)
        if word == "--json":
            options["json"] = True
            continue
        name, equals, value = word.partition("=")
        if name not in VALUE_OPTIONS:
            return None
        if not equals:
            value = next(words, "")
        if not value or value.startswith("-"):
            return None
        if name == "--timeout":
            seconds = _positive_seconds(value)
            if seconds is None:
                return None
            options["timeout"] = seconds
        else:
            options["socket"] = value
    return None  # no command


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``busctl`` command."""
    if argv is None:
        argv = sys.argv[1:]
    args = _parse_simple(argv)
    if args is None:
        args = build_parser().parse_args(argv)
    from busctl.client import (
        BusError,
        Client,
        ClientError,
        DaemonUnavailable,
        Timeout,
    )

    try:
        # Before connecting: bad input is a usage error, busd up or not.
        if args.command == "publish" and args.json_message and args.message != "-":
            args.message = _json_loader()(args.message)
        if (
            args.command == "dead"
            and args.action in ("replay", "drop")
            and args.all == bool(args.ids)
        ):
            raise UsageError(
                f"dead {args.action}: name the letters (IDs from `busctl dead "
                "list`) or --all, not both"
            )
        with Client(args.socket, timeout=args.timeout) as client:
            return COMMANDS[args.command](client, args)
    except UsageError as error:
        return fail(str(error), EX_USAGE)
    except DaemonUnavailable as error:
        return fail(
            f"{error}; start it with `busd start` or `systemctl start busd`",
            EX_UNAVAILABLE,
        )
    except Timeout as error:
        if getattr(args, "wait", False):  # publish --wait: not safe to resend
            return fail(
                f"{error}: not every broker has settled the message yet (it may "
                "still be delivered; raise --timeout rather than publish again)",
                EX_TEMPFAIL,
            )
        return fail(f"{error}; try again or raise --timeout", EX_TEMPFAIL)
    except BusError as error:
        if error.code == "permission_denied":
            return fail(f"{error.message}; ask an admin for access", EX_NOPERM)
        if error.code == "bad_config":
            return fail(error.message, EX_CONFIG)
        if error.code == "busy":
            advice = "" if "try again" in error.message else "; try again later"
            return fail(f"{error.message}{advice}", EX_TEMPFAIL)
        if error.code == "unavailable":  # publish --wait: nothing can take it
            return fail(error.message, EX_UNAVAILABLE)
        if error.code in ("bad_request", "unknown_op", "unknown_channel", "too_large"):
            return fail(
                error.message, EX_USAGE if error.code == "unknown_op" else EX_ERROR
            )
        return fail(error.message, EX_ERROR)
    except ClientError as error:
        return fail(str(error), EX_ERROR)
    except KeyboardInterrupt:
        return EX_OK
    except BrokenPipeError:
        return EX_OK  # `busctl subscribe main | head`: the reader left


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    show(args, client.ping(), "pong")
    return EX_OK


def cmd_state(client: Client, args: argparse.Namespace) -> int:
    state = client.state()
    if args.json:
        show(args, state, "")
    else:
        from busctl.render import render_state

        print(render_state(state, client.path), flush=True)
    # No health in the answer (an older busd): nothing to say it is degraded.
    health = state.get("health") or {}
    return EX_DEGRADED if health.get("status") == "degraded" else EX_OK


def cmd_publish(client: Client, args: argparse.Namespace) -> int:
    if args.message == "-":
        parse = _json_loader() if args.json_message else str
        messages = (parse(line.rstrip("\n")) for line in sys.stdin if line.strip())
        results = client.publish_many(args.channel, messages, wait=args.wait)
        text = f"published {len(results)} messages on {args.channel}"
        dead = sum(result.get("dead", 0) for result in results)
        if args.wait:
            acked = sum(result.get("acked", 0) for result in results)
            text += f": {acked} acked, {dead} dead"
        show(args, results, text)
        if dead:
            return fail(
                f"{sum(bool(r.get('dead')) for r in results)} of {len(results)} "
                f"messages on {args.channel} went to the dead channel; "
                "`busctl logs` says why",
                EX_ERROR,
            )
        return EX_OK
    # The message was parsed by main().
    result = client.publish(args.channel, args.message, wait=args.wait)
    text = (
        f"published message {result['id']} on {args.channel} "
        f"({result['brokers']} brokers, {result['subscribers']} subscribers)"
    )
    if args.wait:
        text += f": {result.get('acked', 0)} acked, {result.get('dead', 0)} dead"
    show(args, result, text)
    if result.get("dead"):
        return fail(
            f"message {result['id']} on {args.channel} went to the dead channel at "
            f"{result['dead']} of {result['brokers']} brokers; `busctl logs` says why",
            EX_ERROR,
        )
    return EX_OK


def _json_loader() -> Any:
    import json

    def load(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(
                f"--json-message: not JSON ({error}): {text[:60]!r}"
            ) from None

    return load


def cmd_subscribe(client: Client, args: argparse.Namespace) -> int:
    stream = client.subscribe(*args.channels)
    for event in stream:
        show(args, event, f"{event['channel']}: {event['message']}")
    return EX_OK


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    stream = client.events()
    for event in stream:
        show(args, event, " ".join(f"{k}={v}" for k, v in event.items() if k != "time"))
    return EX_OK


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    from busctl.render import render_log_entry

    answer = client.logs(lines=args.lines, follow=args.follow, source=args.source)
    result = answer.result if args.follow else answer
    left_out = result.get("left_out", 0)
    if left_out:
        print(
            f"busctl: {left_out} older lines left out (one answer holds at most "
            "768 KiB of log); busd's own log (journalctl -u busd) has them all",
            file=sys.stderr,
        )
    for entry in result["lines"]:
        show(args, entry, render_log_entry(entry))
    if args.follow:
        for entry in answer:
            show(args, entry, render_log_entry(entry))
    return EX_OK


def cmd_lifecycle(client: Client, args: argparse.Namespace) -> int:
    """start, stop, restart: one instance (BROKER:N) or the whole broker."""
    name, index = args.target
    result = getattr(client, f"broker_{args.command}")(name, index)
    past = {"start": "started", "stop": "stopped", "restart": "restarted"}
    return _report_pool(args, result, past[args.command], name, index)


def cmd_scale(client: Client, args: argparse.Namespace) -> int:
    result = client.scale(args.broker, args.instances)
    return _report_pool(args, result, "scaled", args.broker, None)


def _report_pool(
    args: argparse.Namespace,
    result: dict[str, Any],
    done: str,
    name: str,
    index: int | None,
) -> int:
    """Print what a lifecycle op did; exit 1 if an instance did not come up."""
    from busctl.render import not_running, render_pool_change

    show(args, result, render_pool_change(done, name, index, result))
    if done == "stopped":
        return EX_OK
    failed = not_running(name, index, result)
    if failed:
        return fail(
            f"not running after {args.command}: {failed}; `busctl logs` says why",
            EX_ERROR,
        )
    return EX_OK


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    show(args, client.reload(), "reload requested")
    return EX_OK


def cmd_shutdown(client: Client, args: argparse.Namespace) -> int:
    if not getattr(args, "wait", False):  # _parse_simple gives no "wait"
        show(args, client.shutdown(), "shutdown requested")
        return EX_OK
    from busctl.client import Timeout

    try:
        result = client.shutdown(wait=True)
    except Timeout as error:
        return fail(
            f"{error}; it is still stopping: wait longer (busctl --timeout 60 "
            "shutdown --wait) or end it with kill -9",
            EX_TEMPFAIL,
        )
    show(args, result, f"busd (PID {result['pid']}) has exited")
    return EX_OK


def cmd_dead(client: Client, args: argparse.Namespace) -> int:
    from busctl.dead import run

    return run(client, args)


COMMANDS = {
    "ping": cmd_ping,
    "state": cmd_state,
    "publish": cmd_publish,
    "subscribe": cmd_subscribe,
    "events": cmd_events,
    "logs": cmd_logs,
    "start": cmd_lifecycle,
    "stop": cmd_lifecycle,
    "restart": cmd_lifecycle,
    "scale": cmd_scale,
    "reload": cmd_reload,
    "shutdown": cmd_shutdown,
    "dead": cmd_dead,
}


if __name__ == "__main__":
    sys.exit(main())
