"""The ``busctl`` command: talk to busd over its control socket.

Exit statuses (sysexits.h): 0 ok, 1 other error, 64 usage, 69 busd not
running, 75 busy or timed out (try again), 77 permission denied. Errors go
to stderr as one line that says what to do.

Imports are lazy: ``busctl ping`` loads the client and msgpack, never the
daemon or asyncio, so the command starts quickly.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, NoReturn

from busd._version import __version__

EX_OK = 0
EX_ERROR = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77

EXIT_STATUS = """\
exit status: 0 ok, 1 error, 64 usage, 69 busd not running, 75 busy or
timed out, 77 permission denied."""

EPILOG = f"""\
examples:
  busctl state
  busctl publish main "BUY ABCD 10"
  busctl publish --json-message orders '{{"code": "ABCD", "n": 10}}'
  printf 'BUY ABCD 10\\nSELL EFGH 5\\n' | busctl publish main -
  busctl subscribe main
  busctl logs -f

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
    ],
    "subscribe": ["busctl subscribe main", "busctl --json subscribe main audit"],
    "events": ["busctl events"],
    "logs": ["busctl logs -n 20", "busctl logs -f"],
    "reload": ["busctl reload"],
    "shutdown": ["busctl shutdown"],
}


class UsageError(Exception):
    """The command line asks for something impossible (exit status 64)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 64.

    Plain argparse prints the whole usage and exits 2, which sysexits calls
    nothing in particular; scripts calling busctl test for 64.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message}; see `{self.prog} --help`\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        # nan and inf would reach socket.settimeout() and raise there.
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
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _epilog(command: str) -> str:
    lines = "\n".join(f"  {example}" for example in EXAMPLES[command])
    return f"examples:\n{lines}\n\n{EXIT_STATUS}\n"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, shared by ``main`` and the docs."""
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
        default=10.0,
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
    command("state", help="bus state, process figures, brokers")
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
    command("reload", help="reload the configuration (like SIGHUP)")
    command("shutdown", help="stop busd")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``busctl`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from busctl.client import (
        BusError,
        Client,
        ClientError,
        DaemonUnavailable,
        Timeout,
    )

    try:
        if args.command == "publish" and args.json_message and args.message != "-":
            # Before connecting: bad input is a usage error, busd up or not.
            args.message = _json_loader()(args.message)
        with Client(args.socket, timeout=args.timeout) as client:
            return COMMANDS[args.command](client, args)
    except UsageError as error:
        return _fail(str(error), EX_USAGE)
    except DaemonUnavailable as error:
        return _fail(
            f"{error}; start it with `busd start` or `systemctl start busd`",
            EX_UNAVAILABLE,
        )
    except Timeout as error:
        return _fail(f"{error}; try again or raise --timeout", EX_TEMPFAIL)
    except BusError as error:
        if error.code == "permission_denied":
            return _fail(f"{error.message}; ask an admin for access", EX_NOPERM)
        if error.code == "busy":
            return _fail(f"{error.message}; try again later", EX_TEMPFAIL)
        if error.code in ("bad_request", "unknown_op", "unknown_channel", "too_large"):
            return _fail(
                error.message, EX_USAGE if error.code == "unknown_op" else EX_ERROR
            )
        return _fail(error.message, EX_ERROR)
    except ClientError as error:
        return _fail(str(error), EX_ERROR)
    except KeyboardInterrupt:
        return EX_OK
    except BrokenPipeError:
        return EX_OK  # `busctl subscribe main | head`: the reader left


def _fail(message: str, status: int) -> int:
    print(f"busctl: {message}", file=sys.stderr)
    return status


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    if args.json:
        import json

        print(json.dumps(value, default=repr), flush=True)
    else:
        print(text, flush=True)


def cmd_ping(client: Any, args: argparse.Namespace) -> int:
    _print(args, client.ping(), "pong")
    return EX_OK


def cmd_state(client: Any, args: argparse.Namespace) -> int:
    state = client.state()
    if args.json:
        _print(args, state, "")
    else:
        from busctl.render import render_state

        print(render_state(state, client.path), flush=True)
    return EX_OK


def cmd_publish(client: Any, args: argparse.Namespace) -> int:
    if args.message == "-":
        parse = _json_loader() if args.json_message else str
        messages = (parse(line.rstrip("\n")) for line in sys.stdin if line.strip())
        results = client.publish_many(args.channel, messages)
        _print(args, results, f"published {len(results)} messages on {args.channel}")
        return EX_OK
    result = client.publish(args.channel, args.message)  # parsed by main()
    _print(
        args,
        result,
        f"published message {result['id']} on {args.channel} "
        f"({result['brokers']} brokers, {result['subscribers']} subscribers)",
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


def cmd_subscribe(client: Any, args: argparse.Namespace) -> int:
    stream = client.subscribe(*args.channels)
    for event in stream:
        _print(args, event, f"{event['channel']}: {event['message']}")
    return EX_OK


def cmd_events(client: Any, args: argparse.Namespace) -> int:
    stream = client.events()
    for event in stream:
        _print(
            args, event, " ".join(f"{k}={v}" for k, v in event.items() if k != "time")
        )
    return EX_OK


def cmd_logs(client: Any, args: argparse.Namespace) -> int:
    from busctl.render import render_log_entry

    answer = client.logs(lines=args.lines, follow=args.follow, source=args.source)
    recent = answer.result["lines"] if args.follow else answer["lines"]
    for entry in recent:
        _print(args, entry, render_log_entry(entry))
    if args.follow:
        for entry in answer:
            _print(args, entry, render_log_entry(entry))
    return EX_OK


def cmd_reload(client: Any, args: argparse.Namespace) -> int:
    _print(args, client.reload(), "reload requested")
    return EX_OK


def cmd_shutdown(client: Any, args: argparse.Namespace) -> int:
    _print(args, client.shutdown(), "shutdown requested")
    return EX_OK


COMMANDS = {
    "ping": cmd_ping,
    "state": cmd_state,
    "publish": cmd_publish,
    "subscribe": cmd_subscribe,
    "events": cmd_events,
    "logs": cmd_logs,
    "reload": cmd_reload,
    "shutdown": cmd_shutdown,
}


if __name__ == "__main__":
    sys.exit(main())
