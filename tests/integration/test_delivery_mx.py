"""MX resolution in the real server against a real DNS server on loopback (the DNS owner's
twisted.names test server): null MX and NXDOMAIN bounce, SERVFAIL defers, an MX that points
back at this machine is qmail's permanent "best-preference MX" loop."""

from __future__ import annotations

import pytest

from mailappliance.delivery.remote import T_LOOP
from mailappliance.queue.store import QueueStore
from mailappliance.testing.dnsserver import DNSServerProcess
from tests.integration.delivery_support import maildir_files, queue_ids, wait_until

ZONES = {
    "nomail.example": {"@": [["MX", "0 ."]]},
    "loop.example": {"@": [["MX", "10 mx"]], "mx": [["A", "127.0.0.1"]]},
    "broken.example": {"@": [["MX", "10 mx"]], "mx": [["A", "192.0.2.1"]]},
}


@pytest.fixture
def dns():
    with DNSServerProcess(ZONES) as server:
        server.set_mode("servfail", "broken.example")
        yield server


@pytest.fixture
def srv(make_server, dns):
    s = make_server(f'default_domain = "test.com"\n[dns]\nnameservers = ["{dns.nameserver}"]\n')
    s.root.mkdir(parents=True, exist_ok=True)
    s._write_config()
    s.cli("domain", "add", "test.com")
    s.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    return s.start()


def bounce_for(srv, rcpt: str) -> bytes:
    QueueStore(srv.data / "queue").inject(b"Subject: mx test\n\nhello\n", "test@test.com",
                                          [rcpt])
    [path] = wait_until(lambda: maildir_files(srv), what="the bounce")
    wait_until(lambda: queue_ids(srv) == [], what="the queue to empty")
    return path.read_bytes()


def test_null_mx_bounces(srv, dns):
    data = bounce_for(srv, "x@nomail.example")
    assert b"<x@nomail.example>:\nSorry, I couldn't find any host named nomail.example. " \
           b"(#5.1.2)\n" in data
    assert dns.count("nomail.example", "MX") >= 1


def test_nxdomain_bounces(srv):
    data = bounce_for(srv, "x@nothere.nomail.example")
    assert b"Sorry, I couldn't find any host named nothere.nomail.example. (#5.1.2)" in data


def test_mx_pointing_back_to_us_is_a_permanent_loop(srv):
    data = bounce_for(srv, "x@loop.example")
    assert T_LOOP.encode() in data


def test_servfail_defers_and_keeps_the_message(srv, dns):
    QueueStore(srv.data / "queue").inject(b"Subject: later\n\nhi\n", "test@test.com",
                                          ["x@broken.example"])
    wait_until(lambda: "deferral: Sorry,_I_couldn't_find_any_host_by_that_name" in srv.output(),
               what="the deferral")
    assert len(queue_ids(srv)) == 1 and maildir_files(srv) == []
