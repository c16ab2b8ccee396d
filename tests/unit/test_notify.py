"""sd_notify pieces without sockets: watchdog interval rules and socket addresses."""

from __future__ import annotations

from mailappliance import notify


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0


def test_watchdog_off_without_usec_for_another_pid_or_garbage():
    assert notify.watchdog_interval({}, 7) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "x"}, 7) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None


def test_abstract_socket_names_start_with_nul():
    assert notify.socket_address("@/org/systemd/notify") == b"\0/org/systemd/notify"
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_send_without_socket_is_a_no_op_and_a_dead_socket_is_not_an_error(tmp_path):
    assert notify.send(None, "READY=1") is False
    assert notify.send("", "READY=1") is False
    assert notify.send(str(tmp_path / "nobody-listens"), "READY=1") is False
