"""Users and groups: one rule, in busd/principals.py, for every place that
names one (check-config, the access policy, the socket's group, a worker's
owner)."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from busd.config import parse_config
from busd.daemon import check_names
from busd.principals import gid_of, identity_of, uid_of


def unknown_uid() -> int:
    """A uid the user database does not know."""
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def test_a_name_must_exist_and_the_error_names_the_key():
    assert uid_of("nobody", "[access] read_users") == pwd.getpwnam("nobody").pw_uid
    assert gid_of("nogroup", "[busd] group") == grp.getgrnam("nogroup").gr_gid
    with pytest.raises(ValueError, match=r"^\[access\] read_users: unknown user"):
        uid_of("no-such-user-here", "[access] read_users")
    with pytest.raises(ValueError, match=r"^\[busd\] group: unknown group"):
        gid_of("no-such-group-here", "[busd] group")


def test_a_bare_number_is_taken_as_it_is_in_allow_lists():
    # The kernel reports a caller's uid whether or not the database knows it.
    missing = unknown_uid()
    assert uid_of(missing, "[access] write_users") == missing
    assert gid_of(missing, "[access] write_groups") == missing


def test_a_user_a_process_runs_as_must_exist_even_as_a_number():
    nobody = pwd.getpwnam("nobody")
    by_name = identity_of("nobody", "[brokers.x] user")
    assert by_name == identity_of(nobody.pw_uid, "[brokers.x] user")
    assert (by_name.uid, by_name.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert by_name.groups[0] == nobody.pw_gid  # the primary group first
    assert len(set(by_name.groups)) == len(by_name.groups)
    missing = unknown_uid()
    with pytest.raises(
        ValueError, match=rf"\[brokers\.x\] user: unknown uid {missing}"
    ):
        identity_of(missing, "[brokers.x] user")


def test_check_names_refuses_a_broker_user_the_database_does_not_know():
    # Before: check-config said OK, then the spawn raised KeyError.
    missing = unknown_uid()
    config = parse_config(
        {"brokers": {"x": {"handler": "m:C", "user": missing}}}, "busd.toml"
    )
    with pytest.raises(ValueError, match=r"\[brokers\.x\] user: unknown uid"):
        check_names(config)
    check_names(parse_config({"access": {"read_users": [missing]}}, "busd.toml"))


def test_busd_check_config_exits_78_naming_the_key(tmp_path: Path):
    missing = unknown_uid()
    path = tmp_path / "busd.toml"
    path.write_text(f'[brokers.x]\nhandler = "m:C"\nuser = {missing}\n')
    os.chmod(path, 0o644)
    done = subprocess.run(
        [sys.executable, "-m", "busd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 78, done.stderr
    assert f"[brokers.x] user: unknown uid {missing}" in done.stderr
