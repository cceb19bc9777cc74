"""netlink.addresses: the stdlib address dump the agent reads every cycle, against `ip -j addr` and by hand."""
from __future__ import annotations

import json
import socket
import struct
import subprocess

import pytest

from etcdha import netlink

pytestmark = pytest.mark.unit


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def newaddr(family: int, index: int, *attrs: tuple[int, str]) -> bytes:
    body = struct.pack("BBBBI", family, 24, 0, 0, index)
    body += b"".join(_attr(kind, socket.inet_pton(family, ip)) for kind, ip in attrs)
    return struct.pack("IHHII", 16 + len(body), netlink.RTM_NEWADDR, 2, 1, 0) + body


DONE = struct.pack("IHHII", 20, netlink.NLMSG_DONE, 2, 1, 0) + b"\0" * 4


def test_local_wins_over_the_peer_address_and_the_dump_ends_at_done():
    data = (newaddr(socket.AF_INET, 2, (netlink.IFA_ADDRESS, "198.18.9.9"), (netlink.IFA_LOCAL, "198.18.0.11"))
            + newaddr(socket.AF_INET, 2, (netlink.IFA_ADDRESS, "198.18.1.1"))
            + newaddr(socket.AF_INET6, 3, (netlink.IFA_ADDRESS, "2001:2::1")))
    assert netlink.parse_addresses(data) == ({2: {"198.18.0.11", "198.18.1.1"}, 3: {"2001:2::1"}}, False)
    assert netlink.parse_addresses(data + DONE)[1] is True


def test_a_truncated_message_is_not_read_past_its_end():
    whole = newaddr(socket.AF_INET, 2, (netlink.IFA_ADDRESS, "198.18.1.1"))
    assert netlink.parse_addresses(whole[:20]) == ({}, False)


def test_the_dump_agrees_with_ip_on_this_host():
    """Read-only: lists this namespace's IPv4 addresses both ways (iproute2 is an independent decoder)."""
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        pytest.skip(f"ip -j addr: {out.stderr.strip()}")
    theirs: dict[int, set[str]] = {}
    for link in json.loads(out.stdout):
        for a in link.get("addr_info", []):
            theirs.setdefault(link["ifindex"], set()).add(a["local"])
    assert netlink.addresses() == theirs
