"""Every user-facing error message of busd and busctl is in docs/runbook.md.

The messages are read from the source with :mod:`ast`, not from a list kept
by hand, so a new error message fails this test until the runbook explains
it. A message is *user-facing* when the source passes it to one of:

- the error types whose text reaches the operator: ``ProtocolError`` and
  ``BusError`` (their message argument), ``ConfigError``, ``_Invalid`` (the
  "expected ..." and note parts of a config error line), ``ops.args.bad``
  (the "expected" part of a bad request), ``error_reply``;
- any ``raise SomeClass(...)`` (its message argument; ``OSError(errno,
  text)`` its second argument);
- the log: ``log.error/warning/exception/critical(...)`` (``%s`` and the
  like are placeholders), and ``bus.log``/``_log`` called with a
  ``logging.WARNING``/``ERROR``/``CRITICAL`` level;
- the terminal: busctl's ``fail(...)``, ``parser.error(...)``,
  ``ArgumentParser.exit(status, text)``, ``print(..., file=sys.stderr)``,
  and config.py's ``errors.append(...)``/``table.error(...)`` lines.

A message is the concatenation of string literals and f-string literal
parts; everything computed (``{path}``, ``%s``, ``str(error)``) is a
placeholder. A name (``expected = f"an integer >= {lo}"``) is followed to
its assignments in the enclosing functions, each assignment (and each
branch of ``a if c else b``) counting as a message of its own. The
literal pieces between placeholders are the message's *fragments*; each
fragment of at least ``MIN_FRAGMENT`` characters must appear in the
runbook (with whitespace runs collapsed), or the longest fragment when
none is that long. So the runbook shows a message as the operator sees it,
with PATH, N and the like where the placeholders are.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNBOOK = REPO / "docs" / "runbook.md"
PACKAGES = ("busd", "busctl")

#: Fragments this long must each be in the runbook (shorter ones are
#: glue such as ", got " that would match anywhere).
MIN_FRAGMENT = 12
#: When a message has no long fragment, its longest must be in the runbook
#: if it has at least this many characters; shorter messages are only
#: placeholders and punctuation (``f"busd: {error}"``) and say nothing.
MIN_SHORT_FRAGMENT = 5

#: Messages that are not user-facing, each matched by a fragment of its
#: text, with the reason. Keep this short: when in doubt, document it.
NOT_USER_FACING = {
    # PEP 562 __getattr__ of busd, busd.plugins and busctl: Python's own
    # error for a programmer who imports a name that does not exist.
    "has no attribute": "Python's AttributeError for a wrong import",
    # Instance.change_state guards the state diagram; reaching it is a bug
    # in busd, and the operator sees it as "internal error ID" (documented).
    "no transition": "internal invariant of the instance state machine",
    # Spool() checks its argument for Python callers; busd passes the
    # config's spool_fsync, which config.py has already checked.
    "spool fsync must be one of": "API argument check, unreachable from busd",
    # The argument checks of `python -m busd.worker`, which only busd runs,
    # always with exactly one of --handler and --exec and a program.
    "give exactly one of --handler": "worker command line, written by busd",
    "--exec needs a program": "worker command line, written by busd",
    "needs a value": "worker command line, written by busd",
    # ForkServerGone: WorkerLauncher catches it and tries the start again on
    # the next fork server; the death itself is logged (documented).
    "the fork server is gone": "ForkServerGone, retried by WorkerLauncher",
    "cannot reach the fork server": "ForkServerGone, retried by WorkerLauncher",
    "--instance needs a number, got": "worker command line, written by busd",
    "python -m busd.worker: error:": "worker command line, written by busd",
    "unknown argument": "worker command line, written by busd",
    # `python -m busd.forkserver` is started by busd only, with its socket
    # as the argument, and hears only busd's requests on it.
    "usage: python -m busd.forkserver FD": "fork server command line, by busd",
    "busd fork server: unknown request": "fork server requests, written by busd",
}

# Calls whose argument at this index (or keyword) is a message, by name.
MESSAGE_ARGUMENTS: dict[str, tuple[int | str, ...]] = {
    "ProtocolError": (1, "message"),
    "BusError": (1, "message"),
    "ConfigError": (0,),
    "_Invalid": (0, 3, "expected", "note"),
    "bad": (2,),
    "error_reply": (2,),
    "fail": (0,),  # busctl.output.fail
}
LOG_METHODS = {"error", "warning", "exception", "critical"}
LOUD_LEVELS = {"WARNING", "ERROR", "CRITICAL"}
PERCENT_FORMAT = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrgfix]")

#: One message variant: literal text, with None for each placeholder.
Pieces = tuple[str | None, ...]


@dataclass(frozen=True)
class Message:
    """One user-facing message as found in the source."""

    where: str
    pieces: Pieces

    def shown(self) -> str:
        """The message with ``...`` for each placeholder."""
        return "".join("..." if p is None else p for p in self.pieces)

    def fragments(self) -> list[str]:
        """The literal runs between placeholders, whitespace collapsed."""
        runs, current = [], ""
        for piece in (*self.pieces, None):
            if piece is None:
                text = " ".join(current.split())
                if text:
                    runs.append(text)
                current = ""
            else:
                current += piece
        return runs

    def required(self) -> list[str]:
        """The fragments that must appear in the runbook."""
        runs = self.fragments()
        long = [run for run in runs if len(run) >= MIN_FRAGMENT]
        if long:
            return long
        longest = max(runs, key=len, default="")
        return [longest] if len(longest) >= MIN_SHORT_FRAGMENT else []


class _Collector(ast.NodeVisitor):
    """Finds the message arguments of the calls listed in the module doc."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scopes: list[ast.AST] = []
        self.found: list[Message] = []
        self._raised: set[int] = set()

    # -- scopes, for following names to their assignments -----------------

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scopes.append(node)
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Raise(self, node: ast.Raise) -> None:
        if isinstance(node.exc, ast.Call):
            self._raised.add(id(node.exc))
        self.generic_visit(node)

    # -- the calls -----------------------------------------------------------

    def visit_Call(self, node: ast.Call) -> None:
        name = _callee(node.func)
        receiver = _receiver(node.func)
        percent = False
        arguments: tuple[int | str, ...] = ()
        if name in MESSAGE_ARGUMENTS:
            arguments = MESSAGE_ARGUMENTS[name]
        elif name in LOG_METHODS and receiver is not None:
            # log.error(...), parser.error(...), table.error(...)
            arguments, percent = (0,), receiver in {"log", "logger", "_logger"}
        elif name == "exit" and receiver == "self" and len(node.args) == 2:
            arguments = (1,)  # ArgumentParser.exit(status, message)
        elif (
            (name in {"log", "_log"} and _loud(node))  # bus.log(..., level=...)
            or (name == "append" and receiver == "errors")  # config.py's lines
            or (name == "print" and _to_stderr(node))
        ):
            arguments = (0,)
        elif id(node) in self._raised:
            two = name == "OSError" and len(node.args) >= 2
            arguments = (1,) if two else (0,)
        for which in arguments:
            argument = _argument(node, which)
            if argument is None:
                continue
            for pieces in self._variants(argument, percent, depth=0):
                if any(p for p in pieces if p is not None):
                    where = f"{self.path.relative_to(REPO)}:{node.lineno}"
                    self.found.append(Message(where, pieces))
        self.generic_visit(node)

    # -- turning an expression into message variants -------------------------

    def _variants(self, node: ast.AST, percent: bool, depth: int) -> list[Pieces]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [_split_percent(node.value) if percent else (node.value,)]
        if isinstance(node, ast.JoinedStr):
            pieces: list[str | None] = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    pieces.append(str(value.value))
                else:
                    pieces.append(None)
            return [tuple(pieces)]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left = self._variants(node.left, percent, depth)
            right = self._variants(node.right, percent, depth)
            return [a + b for a, b in itertools.product(left, right)]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            # note * is_number: the side that holds text, shown or not
            for side in (node.left, node.right):
                variants = self._variants(side, percent, depth)
                if any(p for v in variants for p in v if p is not None):
                    return variants
            return [(None,)]
        if isinstance(node, ast.IfExp):
            return self._variants(node.body, percent, depth) + self._variants(
                node.orelse, percent, depth
            )
        if isinstance(node, ast.Name) and depth < 3:
            values = self._assigned(node.id)
            if values:
                return [
                    variant
                    for value in values
                    for variant in self._variants(value, percent, depth + 1)
                ]
        return [(None,)]

    def _assigned(self, name: str) -> list[ast.AST]:
        """What ``name`` is assigned in the innermost enclosing function."""
        for scope in reversed(self.scopes):
            values = [
                value
                for node in ast.walk(scope)
                if (value := _assigned_value(node, name)) is not None
            ]
            if values:
                return values
        return []


def _assigned_value(node: ast.AST, name: str) -> ast.AST | None:
    """The value ``node`` gives ``name`` (``=``, ``+=``, ``: T =``), if any."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        targets = [node.target]
    else:
        return None
    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
        return node.value
    return None


def _callee(func: ast.AST) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _receiver(func: ast.AST) -> str | None:
    """``log`` for ``log.error``, ``bus`` for ``self.bus.log``."""
    if isinstance(func, ast.Attribute):
        value = func.value
        if isinstance(value, ast.Name):
            return value.id
        if isinstance(value, ast.Attribute):
            return value.attr
    return None


def _argument(node: ast.Call, which: int | str) -> ast.AST | None:
    if isinstance(which, int):
        return node.args[which] if which < len(node.args) else None
    for keyword in node.keywords:
        if keyword.arg == which:
            return keyword.value
    return None


def _loud(node: ast.Call) -> bool:
    """Whether a ``log(msg, level)`` call logs at WARNING or above."""
    level = _argument(node, "level") or _argument(node, 1)
    return isinstance(level, ast.Attribute) and level.attr in LOUD_LEVELS


def _to_stderr(node: ast.Call) -> bool:
    target = _argument(node, "file")
    return isinstance(target, ast.Attribute) and target.attr == "stderr"


def _split_percent(text: str) -> Pieces:
    parts = PERCENT_FORMAT.split(text)
    pieces: list[str | None] = []
    for index, part in enumerate(parts):
        if index:
            pieces.append(None)
        pieces.append(part)
    return tuple(pieces)


def collect_messages() -> list[Message]:
    """Every user-facing message in busd/ and busctl/, one per variant."""
    messages: dict[Pieces, Message] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            collector = _Collector(path)
            collector.visit(ast.parse(path.read_text(), str(path)))
            for message in collector.found:
                messages.setdefault(message.pieces, message)
    return list(messages.values())


def runbook_text() -> str:
    return " ".join(RUNBOOK.read_text().split())


def _allowed(message: Message) -> bool:
    return any(key in message.shown() for key in NOT_USER_FACING)


def test_every_user_facing_message_is_in_the_runbook() -> None:
    text = runbook_text()
    missing = []
    for message in collect_messages():
        if _allowed(message):
            continue
        absent = [fragment for fragment in message.required() if fragment not in text]
        if absent:
            missing.append(
                f"  {message.where}: {message.shown()!r}\n"
                f"      not found: {', '.join(repr(a) for a in absent)}"
            )
    assert not missing, (
        f"{len(missing)} user-facing messages are not in docs/runbook.md. Add "
        "each under Troubleshooting as the operator sees it (placeholders such "
        "as PATH or N for the ... parts), with its cause and fix; or, if it "
        "can never reach a user, to NOT_USER_FACING in tests/test_runbook.py "
        "with the reason:\n" + "\n".join(missing)
    )


def test_the_extraction_finds_the_known_messages() -> None:
    """Guards the extractor itself: a change to the source's calls must not
    make this test find nothing and pass vacuously."""
    shown = [message.shown() for message in collect_messages()]
    assert len(shown) > 120
    for expected in (
        "Reload refused, keeping the running configuration: ...",  # log.error
        "...: refusing a config file writable by ... (mode ...); chmod go-w it",
        "an integer >= ...",  # _Invalid(expected), through the assignment
        "an integer from ... to ...",  # the other branch of the same IfExp
        " (a number: put the octal digits in quotes)",  # _Invalid's note
        "busd is not running: no socket at ...",  # raise DaemonUnavailable
        "...; start it with `busd start` or `systemctl start busd`",  # fail
        "no broker ... (configured: ...)",  # ProtocolError's second argument
        "too many clients; try again later",  # error_reply
        "cannot bind control socket ...: ...",  # OSError(errno, text)
        "a list of integers",  # ops.args.bad's "expected"
        "busd: the daemon failed to start; its log ... says:",  # print(stderr)
        "...: ...; see `... --help`\n",  # busctl's ArgumentParser.exit
    ):
        assert expected in shown, f"the extractor no longer finds {expected!r}"


@pytest.mark.parametrize("key", sorted(NOT_USER_FACING))
def test_each_allow_list_entry_still_matches_a_message(key: str) -> None:
    """A stale entry would silently exempt a future message."""
    assert any(key in message.shown() for message in collect_messages()), (
        f"NOT_USER_FACING[{key!r}] matches no message any more; remove it"
    )
