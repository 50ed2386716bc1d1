"""busctl.Client against a real busd: calls, pipelining, streams, errors."""

import itertools
import os
import signal
import socket

import pytest
from helpers import pause

from busctl.client import (
    BusError,
    Client,
    ClientError,
    DaemonUnavailable,
    Timeout,
)
from busd.protocol import PROTOCOL_VERSION


def test_context_manager_closes_the_connection(busd_daemon):
    with Client(busd_daemon.socket) as client:
        assert client.ping() == "pong"
        with busd_daemon.client() as other:
            assert other.state()["clients"] == 2
    with pytest.raises(ClientError):
        client.ping()
    with busd_daemon.client() as other:
        # busd saw the close: only this client is left.
        assert other.state()["clients"] == 1


def test_socket_path_from_the_environment(busd_daemon, monkeypatch):
    monkeypatch.setenv("BUSD_SOCKET", busd_daemon.socket)
    with Client() as client:
        assert client.path == busd_daemon.socket
        assert client.ping() == "pong"


def test_call_ping_hello_state(busd_daemon):
    with busd_daemon.client() as client:
        assert client.call("ping") == "pong"
        assert client.ping() == "pong"
        hello = client.hello()
        assert hello["version"] == PROTOCOL_VERSION
        assert hello["pid"] == busd_daemon.pid
        assert "publish" in hello["ops"]
        state = client.state()
        assert state["state"] == "STARTED"
        assert state["pid"] == busd_daemon.pid


def test_answers_are_matched_to_requests_whatever_the_order(busd_daemon):
    with busd_daemon.client() as client:
        first = client.send("ping")
        second = client.send("state")
        third = client.send("frobnicate")
        assert client.wait(second)["pid"] == busd_daemon.pid
        with pytest.raises(BusError):
            client.wait(third)
        assert client.wait(first) == "pong"


def test_publish_and_publish_many_keep_the_order(busd_daemon):
    with busd_daemon.client() as client:
        one = client.publish("main", {"n": 0})
        assert set(one) == {"id", "brokers", "subscribers"}
        results = client.publish_many("main", ({"n": i} for i in range(1, 201)), 16)
        ids = [one["id"]] + [r["id"] for r in results]
        assert ids == list(range(one["id"], one["id"] + 201))
        assert client.publish_many("main", []) == []
        assert client.state()["published"] == 201


def test_publish_many_raises_the_first_error(busd_daemon):
    with busd_daemon.client() as client:
        with pytest.raises(BusError) as info:
            client.publish_many("", ["a", "b", "c"], window=2)
        assert info.value.code == "bad_request"
        assert "'channel'" in info.value.message
        assert client.ping() == "pong"


def test_stream_iteration_and_next_event(busd_daemon):
    with busd_daemon.client() as listener, busd_daemon.client() as publisher:
        stream = listener.subscribe("main")
        assert stream.result == {"channels": ["main"]}
        publisher.publish_many("main", ["a", "b", "c", "d"])
        assert stream.next_event(5) == {"channel": "main", "message": "a"}
        rest = [event["message"] for event in itertools.islice(stream, 3)]
        assert rest == ["b", "c", "d"]
        # Calls on the same connection while events arrive: events are kept.
        publisher.publish("main", "e")
        assert listener.ping() == "pong"
        assert stream.next_event(5)["message"] == "e"


def test_a_quiet_stream_raises_timeout_with_a_clear_message(busd_daemon):
    with busd_daemon.client(timeout=7) as client:
        stream = client.subscribe("main")
        with pytest.raises(Timeout) as info:
            stream.next_event(0.2)
        assert str(info.value) == f"no event on stream {stream.id} within 0.2 s"
        # The connection is intact and its own timeout is back.
        assert client._sock.gettimeout() == 7
        assert client.ping() == "pong"
        client.publish("main", "late")
        assert stream.next_event(5) == {"channel": "main", "message": "late"}


def test_a_daemon_that_does_not_answer_raises_timeout(busd_daemon):
    with busd_daemon.client(timeout=0.3) as client:
        pause(busd_daemon.pid)
        try:
            with pytest.raises(Timeout) as info:
                client.ping()
        finally:
            os.kill(busd_daemon.pid, signal.SIGCONT)
        assert str(info.value) == "busd did not answer within 0.3 s"
    with busd_daemon.client() as client:
        assert client.ping() == "pong"


def test_no_socket_means_not_running(tmp_path):
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(DaemonUnavailable) as info:
        Client(path)
    assert str(info.value) == f"busd is not running: no socket at {path}"


def test_a_socket_nobody_listens_on_refuses_connections(tmp_path):
    path = str(tmp_path / "dead.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # bound, never listening: what a crashed busd leaves
    dead.close()
    with pytest.raises(DaemonUnavailable) as info:
        Client(path)
    assert str(info.value) == f"busd is not running: {path} refuses connections"


def test_a_daemon_that_exits_is_reported_unavailable(busd_daemon):
    with busd_daemon.client() as client:
        assert client.ping() == "pong"
        assert busd_daemon.stop() == 0
        with pytest.raises(DaemonUnavailable):
            client.ping()


def test_bus_error_carries_code_and_message(busd_daemon):
    with busd_daemon.client() as client:
        with pytest.raises(BusError) as info:
            client.call("frobnicate")
        error = info.value
        assert isinstance(error, ClientError)
        assert error.code == "unknown_op"
        assert error.message.startswith("unknown op 'frobnicate'")
        assert str(error) == f"{error.message} (unknown_op)"
        with pytest.raises(BusError) as info:
            client.call("publish", channel="main")
        assert info.value.code == "bad_request"
        assert info.value.message == "'publish' needs a 'message'"
        assert client.ping() == "pong"


def test_requests_busd_would_refuse_fail_before_sending(busd_daemon):
    with busd_daemon.client() as client:
        with pytest.raises(BusError) as info:
            client.publish("main", b"\0" * (1 << 20))
        assert info.value.code == "too_large"
        with pytest.raises(BusError) as info:
            client.publish("main", object())
        assert info.value.code == "bad_request"
        assert "cannot be encoded as msgpack" in info.value.message
        assert client.ping() == "pong"


def test_a_client_over_max_clients_gets_busy(start_busd):
    daemon = start_busd(config_text="[busd]\nmax_clients = 1\n")
    with daemon.client() as first:
        assert first.ping() == "pong"
        with pytest.raises(BusError) as info, daemon.client() as second:
            second.ping()
        assert info.value.code == "busy"
        assert info.value.message == "too many clients; try again later"
        assert first.ping() == "pong"
