"""``busctl dead``: list, show, replay and drop busd's dead letters.

The output for people; ``--json`` prints busd's answers as they are. A
list is one line per letter, oldest first::

    ID  WHEN                 BROKER  CHANNEL  ATTEMPTS  MESSAGE       LAST ERROR
     1  2026-12-05 11:02:07  orders  main            4  BUY 12 X      ValueError: ...

Loaded only by this command (busctl's start stays quick).
"""

from __future__ import annotations

import time

from busctl.output import EX_ERROR, EX_OK, EX_TEMPFAIL, fail, show

# typing costs busctl's start-up about 3 ms; annotations don't need it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from busctl.client import Client


def run(client: Client, args: argparse.Namespace) -> int:
    """``busctl dead [list|show ID|replay ID...|drop ID...]``: the exit status."""
    action = args.action or "list"
    if action == "list":
        return _list(client, args)
    if action == "show":
        return _show(client, args)
    every = args.all  # with IDs or not: checked by busctl.cli.main
    if action == "replay":
        return _replay(client, args, client.dead_replay(*args.ids, every=every))
    result = client.dead_drop(*args.ids, every=every)
    dropped, count = result["dropped"], result["dropped_count"]
    show(
        args,
        result,
        f"dropped {count} dead letters ({_ids(dropped, count)}); "
        f"{result['count']} left",
    )
    return EX_OK


def _list(client: Client, args: argparse.Namespace) -> int:
    letters = client.dead_letters()
    overflowed = client.dead_list(limit=1)["overflowed"] if letters else 0
    if args.json:
        show(args, letters, "")
        return EX_OK
    if not letters:
        print("no dead letters", flush=True)
        return EX_OK
    header = ["ID", "WHEN", "BROKER", "CHANNEL", "ATTEMPTS", "MESSAGE", "LAST ERROR"]
    rows = [
        [
            str(letter["id"]),
            _when(letter["when"]),
            letter["broker"],
            letter["channel"],
            str(letter["attempts"]),
            letter["preview"],
            letter["error"],
        ]
        for letter in letters
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(6)]
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in (0, 4) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        print("  ".join([*cells, row[6]]).rstrip(), flush=True)
    footer = (
        f"{len(letters)} dead letters; `busctl dead show ID` shows one whole, "
        "`busctl dead replay ID...` publishes it again, `busctl dead drop ID...` "
        "removes it"
    )
    if overflowed:
        footer += f"; {overflowed} older ones were dropped (the store was full)"
    print(footer, flush=True)
    return EX_OK


def _show(client: Client, args: argparse.Namespace) -> int:
    letter = client.dead_show(args.id)
    if args.json:
        show(args, letter, "")
        return EX_OK
    lines = [
        f"Dead letter {letter['id']}: message {letter['message_id']} on "
        f"{letter['channel']}, given up by broker {letter['broker']} after "
        f"{letter['attempts']} attempts",
        f"     When: {_when(letter['when'])}",
        f"  Message: {_whole(letter['message'])}",
        "   Errors:" + ("" if letter["errors"] else " none recorded"),
    ]
    for number, error in enumerate(letter["errors"], 1):
        first, *rest = error.splitlines() or [""]
        lines.append(f"    {number}. {first}")
        lines += [f"       {line}" for line in rest]
    print("\n".join(lines), flush=True)
    return EX_OK


def _replay(client: Client, args: argparse.Namespace, result: dict[str, Any]) -> int:
    replayed = result["replayed"]
    count = result["replayed_count"]
    text = f"replayed {count} dead letters" + (
        ": " + ", ".join(f"{r['id']} as message {r['message_id']}" for r in replayed)
        if 0 < count <= 10
        else ""
    )
    show(args, result, text)
    for kept in result["kept"]:
        ids, many = kept["ids"], kept["count"] > 1
        fail(
            f"dead letter{'s' if many else ''} {_ids(ids, kept['count'])} "
            f"{'stay' if many else 'stays'} in the store: {kept['error']}",
            EX_ERROR,
        )
    codes = {kept["code"] for kept in result["kept"]}
    if not codes:
        return EX_OK
    # Only busy brokers: they take them later ("try again", 75); anything
    # else (no broker on the channel any more) needs a fix first: 1.
    return EX_TEMPFAIL if codes == {"busy"} else EX_ERROR


def _ids(ids: list[int], count: int) -> str:
    """The first ten of ``count`` ids (``ids`` may hold only the first ones)."""
    shown = ", ".join(map(str, ids[:10]))
    return shown + (f" and {count - 10} more" if count > 10 else "")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _whole(message: Any) -> str:
    if isinstance(message, str):
        return message
    import json

    return json.dumps(message, default=repr, ensure_ascii=False)
