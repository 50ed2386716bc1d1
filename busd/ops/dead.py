"""The dead-letter ops: ``dead_list``, ``dead_show`` (read); ``dead_replay``,
``dead_drop`` (write).

The letters are the router's store (busd/deadletters.py). ``dead_replay``
publishes each letter's message again on its channel, as a new message
(a new id, every broker on the channel, ``busy`` and the spool as for any
publish); a letter whose message is refused stays in the store, and the
answer says why. Ids that are not in the store refuse the whole request
before anything is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from busd.control.requests import RequestContext
from busd.deadletters import DeadLetters
from busd.ops import args as check
from busd.ops.services import OpServices
from busd.protocol import ErrorCode, ProtocolError

log = logging.getLogger("busd")

#: The most letters one ``dead_list`` answer summarises (about 400 bytes
#: each at most: well under a client's 1 MiB frame).
MAX_LIST = 1000
#: Letters replayed between two turns of the loop.
REPLAY_BATCH = 100


def dead_list(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """A page of letters in short, oldest first, from after id ``after``."""
    check.only(args, "dead_list", "after", "limit")
    after = check.whole_number(args.get("after", 0), "dead_list", "after", 0, None)
    limit = check.whole_number(
        args.get("limit", MAX_LIST), "dead_list", "limit", 1, MAX_LIST
    )
    store = services.router.dead_letters
    page = [letter for letter in store.letters.values() if letter.id > after]
    return {
        "letters": [letter.summary() for letter in page[:limit]],
        "more": len(page) > limit,
        "count": len(store),
        "overflowed": store.overflowed,
    }


def dead_show(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """One whole letter: its message, every error kept."""
    check.only(args, "dead_show", "letter")
    letter_id = check.whole_number(args.get("letter"), "dead_show", "letter", 1, None)
    store = services.router.dead_letters
    letter = store.get(letter_id)
    if letter is None:
        raise _not_found(store, [letter_id])
    return letter.record()


def dead_replay(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> Coroutine[Any, Any, dict[str, Any]]:
    """Publish letters' messages again on their channels; forget those accepted.

    A letter refused (its channel's broker is busy, no broker listens on
    it any more) stays, and so do the later letters of that channel: they
    would be refused alike, and must not overtake it. The arguments are
    checked here; the replay itself is a coroutine that lets the loop run
    between batches of ``REPLAY_BATCH`` (each publish may fsync the
    spool: ten thousand in one go would hold every client and worker).
    """
    store = services.router.dead_letters
    return _replay(services, ctx, _chosen(store, "dead_replay", args))


async def _replay(
    services: OpServices, ctx: RequestContext, letter_ids: list[int]
) -> dict[str, Any]:
    router = services.router
    store = router.dead_letters
    replayed: list[dict[str, Any]] = []
    refused: dict[str, ProtocolError] = {}  # channel -> why
    kept: dict[ProtocolError, list[int]] = {}  # why -> letter ids
    for start in range(0, len(letter_ids), REPLAY_BATCH):
        if start:
            await asyncio.sleep(0)  # acks, other clients: their turn
        done: list[int] = []
        for letter_id in letter_ids[start : start + REPLAY_BATCH]:
            letter = store.get(letter_id)
            if letter is None:
                continue  # dropped or replayed by another client meanwhile
            reason = refused.get(letter.channel)
            if reason is None:
                try:
                    result = router.publish(
                        letter.channel, letter.message, needs_route=True
                    )
                except ProtocolError as error:
                    reason = refused[letter.channel] = error
                else:
                    done.append(letter_id)
                    replayed.append(
                        {
                            "id": letter_id,
                            "message_id": result["id"],
                            "brokers": result["brokers"],
                        }
                    )
                    continue
            kept.setdefault(reason, []).append(letter_id)
        # Gone once accepted: a crash before this line replays them again
        # at worst (at-least-once), never loses one.
        store.remove(done)
    log.info(
        "Dead letters: %d of %d replayed, requested by %s%s",
        len(replayed),
        len(letter_ids),
        ctx.peer,
        "".join(f"; {len(ids)} kept: {why.message}" for why, ids in kept.items()),
    )
    return {
        # Listed up to MAX_LIST (an answer fits a client's frame); counted all.
        "replayed": replayed[:MAX_LIST],
        "replayed_count": len(replayed),
        "kept": [
            {"error": why.message, "code": str(why.code), "ids": ids[:MAX_LIST]}
            | {"count": len(ids)}
            for why, ids in kept.items()
        ],
        "count": len(store),
    }


def dead_drop(
    services: OpServices, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Forget letters for good."""
    store = services.router.dead_letters
    letter_ids = _chosen(store, "dead_drop", args)
    store.remove(letter_ids)
    log.info("Dead letters: %d dropped, requested by %s", len(letter_ids), ctx.peer)
    return {
        "dropped": letter_ids[:MAX_LIST],
        "dropped_count": len(letter_ids),
        "count": len(store),
    }


def _chosen(store: DeadLetters, op: str, args: dict[str, Any]) -> list[int]:
    """The letters ``ids`` names, or every one with ``all``; oldest first."""
    check.only(args, op, "ids", "all")
    every = check.boolean(args, op, "all")
    ids = args.get("ids")
    if every:
        if ids is not None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{op!r} takes 'ids' or 'all', not both"
            )
        return list(store.letters)
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise check.bad(op, "ids", "a non-empty list of letter ids", ids)
    unknown = sorted({i for i in ids if i not in store.letters})
    if unknown:
        raise _not_found(store, unknown)
    return sorted(set(ids))


def _not_found(store: DeadLetters, unknown: list[int]) -> ProtocolError:
    names = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
    count = len(store)
    held = f"{count} letter{'' if count == 1 else 's'}" if count else "no letters"
    return ProtocolError(
        ErrorCode.NOT_FOUND,
        f"no dead letter{'s' if len(unknown) > 1 else ''} {names} (the store "
        f"holds {held}; `busctl dead list` shows them)",
    )
