"""Checks of what a config points at: directories, programs, handler modules.

busd/config.py checks the file alone, with no side effects. This module
looks at what each broker's table names, as its worker would see it: the
worker's environment and working directory come from
busd/supervision/launch.py (``WorkerLauncher``), which starts the real ones.

- :func:`program_errors`, cheap (a few ``stat`` calls): each broker's
  ``cwd`` is a directory, and each ``command``'s program is found (on the
  worker's ``PATH`` when it has no ``/``) and executable. ``busd run``,
  ``start``, ``restart`` and a reload refuse a config that fails them.
- :func:`handler_errors`: each ``handler`` is imported in a throw-away
  interpreter with the broker's environment, working directory and user,
  as the worker imports it (``busd.worker.load_handler``). Only ``busd
  check-config`` does this: importing runs the module's code, and an
  interpreter costs about 100 ms. Brokers that share an environment share
  one interpreter, and the interpreters run in parallel.

Every error is one line naming the file, the table and the key.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterable, Sequence

# subprocess, json and concurrent.futures are imported where the handlers
# are: busd run calls program_errors only, and its start is on the clock.
from busd.config import BrokerConfig, Config
from busd.principals import identity_of
from busd.spawner import ORPHAN_MARK
from busd.supervision.launch import WorkerLauncher

__all__ = ["IMPORT_TIMEOUT", "handler_errors", "program_errors"]

#: Seconds one interpreter may take to import its handlers.
IMPORT_TIMEOUT = 30.0

# The worker's identity in its environment: meaningless for a check, and the
# orphan mark would make a busd starting meanwhile end the checking process.
_IDENTITY = ("BUSD_PID", "BUSD_BROKER", "BUSD_INSTANCE", ORPHAN_MARK)

# Run by each checking interpreter with the handler specs as arguments: one
# JSON line per spec on the original stdout, [spec, error or ""]. A module's
# own output goes to stderr, so it cannot garble the answers.
_IMPORTER = """\
import json, os, sys, traceback
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
from busd.worker import load_handler
for spec in sys.argv[1:]:
    try:
        handler = load_handler(spec)
        error = "" if callable(handler) else (
            f"{spec.partition(':')[2]!r} is a {type(handler).__name__}, "
            "not a class or a callable"
        )
    except ValueError as exc:
        error = str(exc)
    except BaseException as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        error = "importing it raised " + lines[-1].strip()
    answers.write(json.dumps([spec, error]) + "\\n")
    answers.flush()
"""


def program_errors(config: Config, base_dir: str | None) -> list[str]:
    """What is wrong with the brokers' ``cwd`` and ``command``; [] if nothing.

    ``base_dir``: where a relative ``cwd`` starts (the config file's
    directory), as for busd.
    """
    launcher = WorkerLauncher(config.busd.socket, base_dir)
    errors: list[str] = []
    for broker in config.brokers.values():
        where = f"{config.source}: [brokers.{broker.name}]"
        cwd = launcher.cwd(broker)
        if not os.path.isdir(cwd):
            what = "is not a directory" if os.path.exists(cwd) else "does not exist"
            errors.append(f'{where} cwd: "{broker.cwd}" ({cwd}) {what}')
            continue
        if broker.command:
            path = launcher.environment(broker, 0).get("PATH", os.defpath)
            problem = _program_problem(broker.command[0], cwd, path)
            if problem:
                errors.append(f"{where} command[0]: {problem}")
    return errors


def _program_problem(program: str, cwd: str, path: str) -> str:
    """Why ``program`` cannot be executed from ``cwd`` with ``PATH=path``."""
    if "/" in program:
        candidates = [os.path.normpath(os.path.join(cwd, program))]
    else:
        candidates = [
            os.path.normpath(os.path.join(cwd, directory or ".", program))
            for directory in path.split(os.pathsep)
        ]
    refused = []
    for candidate in candidates:
        try:
            mode = os.stat(candidate).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and os.access(candidate, os.X_OK):
            return ""
        refused.append((candidate, mode))
    if refused:
        # As execvp would: the first one found is the one it would report.
        candidate, mode = refused[0]
        why = (
            "is a directory"
            if stat.S_ISDIR(mode)
            else f"is not executable (mode {stat.S_IMODE(mode):04o})"
        )
        return f'"{program}": {candidate} {why}'
    if "/" in program:
        return f'"{program}": no such file ({candidates[0]})'
    return f'"{program}" is not on the worker\'s PATH ({path})'


def handler_errors(
    config: Config, base_dir: str | None, timeout: float = IMPORT_TIMEOUT
) -> list[str]:
    """What goes wrong importing each broker's ``handler``; [] if nothing.

    Brokers whose ``cwd`` does not exist are left out: :func:`program_errors`
    reports them.
    """
    launcher = WorkerLauncher(config.busd.socket, base_dir)
    groups: dict[tuple[object, ...], list[BrokerConfig]] = {}
    runs: dict[tuple[object, ...], tuple[dict[str, str], str, str]] = {}
    for broker in config.brokers.values():
        cwd = launcher.cwd(broker)
        if not broker.handler or not os.path.isdir(cwd):
            continue
        env = {
            k: v
            for k, v in launcher.environment(broker, 0).items()
            if k not in _IDENTITY
        }
        user = _worker_user(config, broker)
        key = (cwd, user, tuple(sorted(env.items())))
        groups.setdefault(key, []).append(broker)
        runs[key] = (env, cwd, user)
    if not groups:
        return []
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(groups), max(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        found = pool.map(
            lambda key: _import_in_interpreter(groups[key], *runs[key], timeout),
            list(groups),
        )
        results = {name: error for answers in found for name, error in answers}
    return [
        f"{config.source}: [brokers.{name}] handler: {results[name]}"
        for name in config.brokers
        if results.get(name)
    ]


def _worker_user(config: Config, broker: BrokerConfig) -> str:
    """Whom the worker runs as, if not as this process's user: "" for that.

    As busd does (busd/supervision/launch.py): a root busd drops to
    ``[busd] user`` before its workers start, or forks them as the broker's
    ``user``; a busd that is not root forks them as itself.
    """
    if os.geteuid() != 0:
        return ""
    return str(config.busd.user or broker.user or "")


def _import_in_interpreter(
    brokers: Sequence[BrokerConfig],
    env: dict[str, str],
    cwd: str,
    user: str,
    timeout: float,
) -> Iterable[tuple[str, str]]:
    """Import every broker's handler in one new interpreter: (name, error)."""
    import json
    import subprocess

    specs = [broker.handler or "" for broker in brokers]
    uid = gid = groups = None
    # An unknown user: check_names reports it; import as this process's user.
    with contextlib.suppress(ValueError):
        if user:
            uid, gid, groups = identity_of(user, "user")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _IMPORTER, *specs],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
    except subprocess.TimeoutExpired:
        # run() has killed it (by its PID) and reaped it.
        error = f"importing it took more than {timeout:g} s (interrupted)"
        return [(broker.name, error) for broker in brokers]
    answers: dict[str, str] = {}
    for line in done.stdout.splitlines():
        try:
            spec, error = json.loads(line)
        except ValueError:
            continue
        answers[spec] = error
    last_words = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
    return [
        (
            broker.name,
            answers.get(
                broker.handler or "",
                f"the importing interpreter ended (exit status {done.returncode}) "
                f"before it was done: {last_words}",
            ),
        )
        for broker in brokers
    ]
