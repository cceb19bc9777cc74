"""Delete an address with one rtnetlink request (stdlib only).

The fence removes VIPs with this: it must stay small and act within its margin,
so it neither imports pyroute2 (a large import at the worst moment) nor runs `ip`.
The kernel's acknowledgement is the verification: 0 means deleted, EADDRNOTAVAIL
means it was not there; either way the address is gone.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Iterable

NETLINK_ROUTE = 0
RTM_DELADDR = 21
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
IFA_ADDRESS, IFA_LOCAL = 1, 2
GONE = {errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH, errno.ENODEV}


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def delete_request(index: int, cidr: str, seq: int = 1) -> bytes:
    """The RTM_DELADDR message for `cidr` on interface `index` (pure, for tests)."""
    vip = ipaddress.ip_interface(cidr)
    family = socket.AF_INET if vip.version == 4 else socket.AF_INET6
    body = struct.pack("BBBBI", family, vip.network.prefixlen, 0, 0, index)
    if vip.version == 4:
        body += _attr(IFA_LOCAL, vip.ip.packed)
    body += _attr(IFA_ADDRESS, vip.ip.packed)
    return struct.pack("IHHII", 16 + len(body), RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def delete_address(interface: str, cidr: str, timeout: float = 2.0) -> bool:
    """Remove `cidr` from `interface` in our network namespace; True if it was there.

    Raises OSError for anything but "not there" (e.g. EPERM without CAP_NET_ADMIN).
    """
    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        return False  # no such interface: no such address either
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        seq = os.getpid() & 0xFFFF
        sock.send(delete_request(index, cidr, seq))
        for _ in range(16):  # bounded: our ack is the first message addressed to us
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, got_seq, _pid = struct.unpack_from("IHHII", data, offset)
                if kind == NLMSG_ERROR and got_seq == seq:
                    code = -struct.unpack_from("i", data, offset + 16)[0]
                    if code == 0:
                        return True
                    if code in GONE:
                        return False
                    raise OSError(code, f"deleting {cidr} from {interface}: {os.strerror(code)}")
                offset += max(length, 16)
    raise OSError(errno.EIO, f"deleting {cidr} from {interface}: no answer from the kernel")


def delete_addresses(vips: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Remove every (interface, cidr); returns (removed, errors). Never raises: the fence tries them all."""
    removed, errors = [], []
    for interface, cidr in vips:
        try:
            if delete_address(interface, cidr):
                removed.append(f"{cidr} on {interface}")
        except OSError as exc:
            errors.append(str(exc))
    return removed, errors
