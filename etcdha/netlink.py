"""Add, delete and list addresses with plain rtnetlink requests (stdlib only).

The fence removes VIPs with this: it must stay small and act within its margin,
so it neither imports pyroute2 (a large import at the worst moment) nor runs `ip`.
The kernel's acknowledgement is the verification: 0 means deleted, EADDRNOTAVAIL
means it was not there; either way the address is gone. The agent adds and lists
with it too: pyroute2's encoding and decoding of the same messages was most of an
agent's CPU while it took over hundreds of services.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Iterable

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_DONE, NLMSG_ERROR = 3, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_BROADCAST = 1, 2, 3, 4
IFA_F_NODAD = 0x02
SIOCGIFHWADDR = 0x8927
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


def add_request(index: int, cidr: str, label: str = "", seq: int = 1) -> bytes:
    """The RTM_NEWADDR message adding `cidr` to interface `index` (pure, for tests).

    IPv4: local and peer address, the subnet's broadcast and `label` (at most 15 bytes, as
    `ip addr add ... label` takes it); IPv6: no duplicate address detection (IFA_F_NODAD),
    so the address is usable at once (the caller probed for duplicates itself). Fails
    with EEXIST if the address is there already (NLM_F_EXCL).
    """
    vip = ipaddress.ip_interface(cidr)
    family = socket.AF_INET if vip.version == 4 else socket.AF_INET6
    flags = 0 if vip.version == 4 else IFA_F_NODAD
    body = struct.pack("BBBBI", family, vip.network.prefixlen, flags, 0, index)
    body += _attr(IFA_LOCAL, vip.ip.packed) if vip.version == 4 else b""
    body += _attr(IFA_ADDRESS, vip.ip.packed)
    if vip.version == 4:
        body += _attr(IFA_BROADCAST, vip.network.broadcast_address.packed)
        if label:
            body += _attr(IFA_LABEL, label.encode()[:15] + b"\0")
    kind_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return struct.pack("IHHII", 16 + len(body), RTM_NEWADDR, kind_flags, seq, 0) + body


def _acks(sock: socket.socket, seqs: set[int], what: str) -> dict[int, int]:
    """Read the kernel's acknowledgements of `seqs`: seq -> errno (0: done)."""
    codes: dict[int, int] = {}
    for _ in range(16 + 4 * len(seqs)):  # bounded: every request gets one ack, several per datagram at most
        if len(codes) == len(seqs):
            return codes
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _flags, got_seq, _pid = struct.unpack_from("IHHII", data, offset)
            if kind == NLMSG_ERROR and got_seq in seqs and offset + 20 <= len(data):
                codes[got_seq] = -struct.unpack_from("i", data, offset + 16)[0]
            offset += max((length + 3) & ~3, 16)
    if len(codes) == len(seqs):
        return codes
    raise OSError(errno.EIO, f"{what}: no answer from the kernel")


def add_addresses(interface: str, cidrs: list[str], label: str = "", timeout: float = 2.0) -> dict[str, object]:
    """Add every one of `cidrs` to `interface` over one socket: cidr -> True (added), False (was there) or
    an OSError. Raises OSError if the interface does not exist or the kernel does not answer."""
    index = socket.if_nametoindex(interface)
    done: dict[str, object] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        base = (os.getpid() & 0xFFFF) << 12
        for first in range(0, len(cidrs), 64):  # a batch of requests, then their acks: the socket buffer holds them
            chunk = cidrs[first:first + 64]
            seqs = {base + first + i: cidr for i, cidr in enumerate(chunk)}
            for seq, cidr in seqs.items():
                sock.send(add_request(index, cidr, label, seq))
            for seq, code in _acks(sock, set(seqs), f"adding addresses to {interface}").items():
                cidr = seqs[seq]
                done[cidr] = True if code == 0 else False if code == errno.EEXIST else OSError(
                    code, f"cannot add {cidr} to {interface}: {os.strerror(code)}")
    return done


def hardware_address(interface: str) -> bytes:
    """The interface's MAC address (SIOCGIFHWADDR on a socket of our network namespace)."""
    import fcntl  # noqa: PLC0415 - only the agent's announcements need it, not the fence's deletes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("256s", interface.encode()[:15]))
    return answer[18:24]


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


def dump_request(family: int, seq: int = 1) -> bytes:
    """The RTM_GETADDR dump request for every address of `family` (pure, for tests)."""
    body = struct.pack("BBBBI", family, 0, 0, 0, 0)
    return struct.pack("IHHII", 16 + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_addresses(data: bytes) -> tuple[dict[int, set[str]], bool]:
    """RTM_NEWADDR messages -> ({ifindex: {address}}, done?) (pure, for tests). IFA_LOCAL wins over IFA_ADDRESS."""
    found: dict[int, set[str]] = {}
    offset, done = 0, False
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("IH", data, offset)
        if length < 16 or offset + length > len(data):
            break  # malformed or cut short: never read past what the kernel sent
        if kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            code = -struct.unpack_from("i", data, offset + 16)[0]
            if code:
                raise OSError(code, f"listing addresses: {os.strerror(code)}")
        elif kind == RTM_NEWADDR and length >= 24:
            family, _plen, _flags, _scope, index = struct.unpack_from("BBBBI", data, offset + 16)
            attrs, pos, end = {}, offset + 24, offset + length
            while pos + 4 <= end:
                alen, akind = struct.unpack_from("HH", data, pos)
                if alen < 4:
                    break
                attrs[akind] = data[pos + 4:pos + alen]
                pos += (alen + 3) & ~3
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is not None and family in (socket.AF_INET, socket.AF_INET6):
                found.setdefault(index, set()).add(socket.inet_ntop(family, raw))
        offset += max((length + 3) & ~3, 16)
    return found, done


def addresses(family: int = socket.AF_INET, timeout: float = 2.0) -> dict[int, set[str]]:
    """Every address of `family` in our network namespace, by interface index: one dump, no pyroute2.

    The agent asks this every cycle to see which VIPs are up; pyroute2's decoding of
    the same dump was most of an idle agent's CPU.
    """
    found: dict[int, set[str]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(dump_request(family, os.getpid() & 0xFFFF))
        for _ in range(10_000):  # bounded: a dump ends with NLMSG_DONE
            part, done = parse_addresses(sock.recv(65536))
            for index, ips in part.items():
                found.setdefault(index, set()).update(ips)
            if done:
                return found
    raise OSError(errno.EIO, "listing addresses: the kernel's dump did not end")
