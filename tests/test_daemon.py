"""busd as a process: start order, signals, reload, clean exit, streams."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import RawConnection, broker, busd_run, wait_for

from busctl.client import BusError, Client, DaemonUnavailable


def test_serves_and_exits_cleanly_on_sigterm(busd_daemon):
    with busd_daemon.client() as client:
        assert client.ping() == "pong"
        state = client.state()
    assert state["state"] == "STARTED"
    assert state["pid"] == busd_daemon.pid
    assert state["process"]["rss"] > 0
    assert stat.S_IMODE(os.stat(busd_daemon.socket).st_mode) == 0o660
    assert Path(busd_daemon.pidfile).read_text().strip() == str(busd_daemon.pid)
    assert busd_daemon.stop() == 0
    assert not os.path.exists(busd_daemon.socket)
    assert not os.path.exists(busd_daemon.pidfile)
    log = busd_daemon.log_text()
    for line in ("Bus STARTED", "Caught signal SIGTERM.", "Bus EXITED"):
        assert line in log
    assert "Traceback" not in log


def test_sigint_exits_too(busd_daemon):
    os.kill(busd_daemon.pid, signal.SIGINT)
    assert busd_daemon.process.wait(15) == 0
    assert not os.path.exists(busd_daemon.socket)


def test_shutdown_op(busd_daemon):
    with busd_daemon.client() as client:
        assert client.shutdown()["stopping"] is True
    assert busd_daemon.process.wait(15) == 0
    assert "Shutdown requested by pid" in busd_daemon.log_text()


def test_publish_reaches_subscribers_on_other_connections(busd_daemon):
    with busd_daemon.client() as listener, busd_daemon.client() as publisher:
        stream = listener.subscribe("main", "audit")
        assert stream.result == {"channels": ["main", "audit"]}
        first = publisher.publish("main", "BUY ABCD 10")
        assert first["subscribers"] == 1 and first["brokers"] == 0
        publisher.publish("other", "nobody hears this")
        publisher.publish("audit", {"structured": [1, 2.5, None]})
        assert stream.next_event(5) == {"channel": "main", "message": "BUY ABCD 10"}
        assert stream.next_event(5) == {
            "channel": "audit",
            "message": {"structured": [1, 2.5, None]},
        }
        stream.cancel()
        publisher.publish("main", "after cancel")
        assert listener.ping() == "pong"
        state = publisher.state()
    assert state["published"] == 4
    assert state["unrouted"] == 4


def test_cancelled_stream_gets_nothing_more(busd_daemon):
    raw = RawConnection(busd_daemon.socket)
    raw.send({"id": 1, "op": "subscribe", "channels": ["main"]})
    assert raw.receive() == {"id": 1, "ok": True, "result": {"channels": ["main"]}}
    with busd_daemon.client() as publisher:
        publisher.publish("main", "before")
        assert raw.receive() == {
            "id": 1,
            "event": {"channel": "main", "message": "before"},
        }
        raw.send({"id": 2, "op": "cancel", "stream": 1})
        assert raw.receive() == {"id": 2, "ok": True, "result": {"cancelled": 1}}
        publisher.publish("main", "after")
        raw.send({"id": 3, "op": "ping"})
        # Had the stream lived on, its event would come before this answer.
        assert raw.receive() == {"id": 3, "ok": True, "result": "pong"}
        raw.send({"id": 4, "op": "cancel", "stream": 1})
        assert raw.receive()["error"]["code"] == "not_found"
    raw.close()


def test_pipelined_publishes_come_back_in_order(busd_daemon):
    with busd_daemon.client() as client:
        results = client.publish_many(
            "main", (f"msg {i}" for i in range(500)), window=50
        )
    ids = [r["id"] for r in results]
    assert ids == sorted(ids) and len(set(ids)) == 500


def test_events_stream_sees_the_shutdown(busd_daemon):
    with busd_daemon.client() as watcher, busd_daemon.client() as admin:
        stream = watcher.events()
        assert stream.result == {"state": "STARTED"}
        admin.shutdown()
        assert stream.next_event(10)["state"] == "STOPPING"
        # The control socket closes while the bus stops: the stream ends.
        with pytest.raises(DaemonUnavailable):
            stream.next_event(10)
    assert busd_daemon.process.wait(15) == 0


def test_logs_recent_and_follow(busd_daemon):
    with busd_daemon.client() as client:
        recent = client.logs(lines=100)["lines"]
        assert any(e["message"] == "Bus STARTED" for e in recent)
        assert client.logs(lines=1)["lines"] == recent[-1:]
        stream = client.logs(lines=0, follow=True)
        assert stream.result == {"lines": []}
        os.kill(busd_daemon.pid, signal.SIGUSR1)
        messages = set()
        wait_for(
            lambda: (
                messages.add(stream.next_event(10)["message"])
                or "Bus graceful" in messages
            ),
            what="the graceful line in the followed log",
        )


def test_reload_applies_a_good_config_and_refuses_a_broken_one(busd_daemon):
    busd_daemon.config.write_text('[busd]\nlog_level = "debug"\n')
    with busd_daemon.client() as client:
        assert client.reload() == {"reloading": True}
        wait_for(lambda: "Reloaded configuration" in busd_daemon.log_text())
        busd_daemon.config.write_text("[busd]\nlog_level = 42\n")
        graceful = busd_daemon.log_text().count("Bus graceful")
        # busctl reload hears the refusal; nothing is applied.
        with pytest.raises(BusError) as refused:
            client.reload()
        assert refused.value.code == "bad_config"
        assert "[busd] log_level: expected" in refused.value.message
        # A SIGHUP cannot be answered: the refusal is in the log.
        os.kill(busd_daemon.pid, signal.SIGHUP)
        wait_for(lambda: "Reload refused" in busd_daemon.log_text())
        # One graceful: the SIGHUP's (the refused op scheduled none).
        assert busd_daemon.log_text().count("Bus graceful") == graceful + 1
        assert client.ping() == "pong"
        assert client.state()["state"] == "STARTED"
    log = busd_daemon.log_text()
    assert "[busd] log_level: expected" in log
    result = subprocess.run(
        [sys.executable, "-m", "busctl", "--socket", busd_daemon.socket, "reload"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 78, result
    assert result.stderr.startswith("busctl: reload refused, the running"), result
    assert busd_daemon.stop() == 0


def test_a_stale_socket_is_replaced(start_busd, tmp_path):
    first = start_busd()
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(10)
    assert os.path.exists(first.socket)  # a crash leaves it behind
    stale_socket = first.socket
    second = subprocess.Popen(
        busd_run(first.config, stale_socket, first.pidfile),
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _answers(stale_socket), timeout=20, what="the new busd")
    finally:
        second.terminate()
        _, err = second.communicate(timeout=15)
    assert b"Removing stale control socket" in err
    assert second.returncode == 0


def test_a_second_daemon_on_the_same_pidfile_refuses(busd_daemon):
    # Before: two tracebacks (the PID file's start step) and exit 70.
    other = subprocess.run(
        busd_run(busd_daemon.config, busd_daemon.socket + "2", busd_daemon.pidfile),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (other.returncode, other.stderr) == (
        75,
        f"busd: already running: PID {busd_daemon.pid} (it holds the PID file "
        f"{busd_daemon.pidfile}); stop it first (busd stop), or give this one "
        "another socket and PID file\n",
    )
    with busd_daemon.client() as client:
        assert client.ping() == "pong"


def test_a_second_daemon_on_the_same_socket_refuses(busd_daemon):
    # Before: two tracebacks (the socket's start step) and exit 70.
    other = subprocess.run(
        busd_run(busd_daemon.config, busd_daemon.socket, busd_daemon.pidfile + "2"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (other.returncode, other.stderr) == (
        75,
        f"busd: already running: PID {busd_daemon.pid} on {busd_daemon.socket}; "
        "stop it first (busd stop), or give this one another socket and PID "
        "file\n",
    )
    assert not os.path.exists(busd_daemon.pidfile + "2")
    with busd_daemon.client() as client:
        assert client.ping() == "pong"


def test_a_second_daemon_on_both_names_the_pid_socket_and_pidfile(busd_daemon):
    other = subprocess.run(
        busd_run(busd_daemon.config, busd_daemon.socket, busd_daemon.pidfile),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (other.returncode, other.stderr) == (
        75,
        f"busd: already running: PID {busd_daemon.pid} on {busd_daemon.socket} "
        f"(PID file {busd_daemon.pidfile}); stop it first (busd stop), or give "
        "this one another socket and PID file\n",
    )


def _answers(path):
    try:
        with Client(path, timeout=2) as client:
            return client.ping() == "pong"
    except Exception:
        return False


def test_unknown_op_and_bad_arguments_are_answered(busd_daemon):
    with busd_daemon.client() as client:
        with pytest.raises(BusError) as info:
            client.call("frobnicate")
        assert info.value.code == "unknown_op"
        assert "unknown op 'frobnicate'" in info.value.message
        with pytest.raises(BusError) as info:
            client.call("publish", channel=5, message="x")
        assert info.value.code == "bad_request"
        assert "'publish' needs 'channel'" in info.value.message
        with pytest.raises(BusError) as info:
            client.call("publish", channel="main", mesage="typo")
        assert "takes no argument 'mesage'" in info.value.message
        assert client.ping() == "pong"


def test_raw_socket_sees_the_documented_frames(busd_daemon):
    raw = RawConnection(busd_daemon.socket)
    raw.send({"id": "a", "op": "ping"})
    assert raw.receive() == {"id": "a", "ok": True, "result": "pong"}
    raw.close()


def test_strict_channels_refuses_a_channel_no_broker_listens_on(start_busd):
    daemon = start_busd(
        "[busd]\nstrict_channels = true\n\n"
        + broker("orders", "brokers_for_tests:Recorder")
    )
    with daemon.client() as client:
        with pytest.raises(BusError) as info:
            client.publish("typo", "BUY ABCD 10")
        assert info.value.code == "unknown_channel"
        assert "no broker listens on channel 'typo'" in info.value.message
        assert (
            client.call("publish", channel="main", message="ok", wait=True)["acked"]
            == 1
        )
        state = client.state()
    assert state["published"] == 1 and state["unrouted"] == 0
    assert daemon.stop() == 0


def test_unrouted_messages_are_counted_when_not_strict(busd_daemon):
    with busd_daemon.client() as client:
        assert client.publish("nobody", "hello")["brokers"] == 0
        assert client.state()["unrouted"] == 1
