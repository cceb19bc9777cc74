"""Virtual IPs: netlink add/remove/list (pyroute2) and gratuitous ARP (a raw packet socket).

Used by the agent and by the fence process, so it imports nothing that starts
threads or gRPC. Everything acts on the network namespace of the calling process.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
import time
from typing import Iterable, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from etcdha import netlink
from etcdha.errors import ActuatorError, ConfigError

ETH_P_ARP = 0x0806
# Label put on every VIP we add, so `ip addr` shows who put it there.
LABEL_SUFFIX = ":ha"


def _index(ipr: IPRoute, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise ActuatorError(f"interface {interface!r} does not exist in this network namespace")
    return found[0]


def addresses(interface: str) -> set[str]:
    """Every IPv4 address on `interface`, as 'a.b.c.d/len'."""
    with IPRoute() as ipr:
        idx = _index(ipr, interface)
        return {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=idx, family=socket.AF_INET)}


def present(interface: str, cidr: str) -> bool:
    try:
        return str(ipaddress.ip_interface(cidr).ip) in {a.split("/")[0] for a in addresses(interface)}
    except ActuatorError:
        return False


def add(interface: str, cidr: str) -> bool:
    """Add the VIP; True if it was added, False if it was already there."""
    vip = ipaddress.ip_interface(cidr)
    with IPRoute() as ipr:
        idx = _index(ipr, interface)
        try:
            ipr.addr("add", index=idx, address=str(vip.ip), prefixlen=vip.network.prefixlen,
                     broadcast=str(vip.network.broadcast_address), label=(interface + LABEL_SUFFIX)[:15])
            return True
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise ActuatorError(f"cannot add {cidr} to {interface}: {exc}") from None


def remove(interface: str, cidr: str) -> bool:
    """Remove the VIP; True if it was there (one netlink request, shared with the fence)."""
    try:
        return netlink.delete_address(interface, cidr)
    except OSError as exc:
        raise ActuatorError(f"cannot remove {cidr} from {interface}: {exc.strerror or exc}") from None


def remove_all(vips: Iterable[tuple[str, str]]) -> list[str]:
    """Remove every (interface, cidr) present; returns those removed. Never raises."""
    return netlink.delete_addresses(vips)[0]


SYSCTL = "/proc/sys/net/ipv4/conf/{}/promote_secondaries"


def keep_secondaries(interface: str) -> bool:
    """Make removing one VIP never remove the others: net.ipv4.conf.IF.promote_secondaries = 1.

    With the kernel's default (0), deleting the primary address of a subnet deletes every
    secondary address of that subnet too; VIPs outside the interface's own subnet are
    exactly that case (the first one added is the primary). True if it was already on
    (for `all` or the interface); raises ConfigError if it is off and cannot be set.
    """
    def read(name: str) -> str:
        try:
            with open(SYSCTL.format(name)) as f:
                return f.read().strip()
        except OSError:
            return ""

    if read("all") == "1" or read(interface) == "1":  # the kernel ORs the two
        return True
    try:
        with open(SYSCTL.format(interface), "w") as f:
            f.write("1")
        return False
    except OSError as exc:
        raise ConfigError(f"cannot set net.ipv4.conf.{interface}.promote_secondaries=1 ({exc.strerror}): without it "
                          f"removing one VIP on {interface} can remove every other address of its subnet; set it "
                          "(e.g. net.ipv4.conf.all.promote_secondaries = 1 in /etc/sysctl.d/, as systemd's "
                          "50-default.conf does) or let the agent write /proc/sys") from None


def _mac(interface: str) -> bytes:
    with IPRoute() as ipr:
        link = ipr.get_links(_index(ipr, interface))[0]
        mac = link.get_attr("IFLA_ADDRESS")
    return bytes.fromhex(mac.replace(":", ""))


def arp_frames(mac: bytes, ip: str) -> list[bytes]:
    """A gratuitous ARP request and reply for `ip` (as keepalived and IPaddr2 send both)."""
    ipb = socket.inet_aton(ip)
    bcast = b"\xff" * 6
    frames = []
    for op, target_mac in ((1, b"\x00" * 6), (2, bcast)):
        eth = bcast + mac + struct.pack("!H", ETH_P_ARP)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + ipb + target_mac + ipb
        frames.append(eth + arp)
    return frames


def probe_frame(mac: bytes, ip: str) -> bytes:
    """An RFC 5227 ARP probe: who has `ip`? (sender address 0.0.0.0, so no cache learns from it)"""
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    return eth + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + b"\0" * 4 + b"\0" * 6 + socket.inet_aton(ip)


def reply_sender(frame: bytes, ip: str, own_mac: bytes) -> Optional[str]:
    """The MAC in `frame` if it is an ARP reply claiming `ip` from another host, else None."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
        return None
    op = struct.unpack("!H", frame[20:22])[0]
    sender_mac, sender_ip = frame[22:28], frame[28:32]
    if op == 2 and sender_ip == socket.inet_aton(ip) and sender_mac != own_mac:
        return ":".join(f"{b:02x}" for b in sender_mac)
    return None


def in_use_elsewhere(interface: str, cidr: str, timeout: float = 0.05) -> Optional[str]:
    """Ask the link whether another host already answers for the VIP; its MAC if so.

    Run before adding a VIP we do not have, so a VIP configured on some other machine
    (or a node that escaped fencing) is never duplicated.
    """
    ip = str(ipaddress.ip_interface(cidr).ip)
    try:
        mac = _mac(interface)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
            sock.bind((interface, 0))
            frame = probe_frame(mac, ip)
            deadline = time.monotonic() + timeout
            sent = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if sent < 2 and left <= timeout * (1 - sent / 2):
                    sock.send(frame)
                    sent += 1
                sock.settimeout(min(left, timeout / 2))
                try:
                    found = reply_sender(sock.recv(128), ip, mac)
                except socket.timeout:
                    continue
                if found:
                    return found
    except OSError as exc:
        raise ActuatorError(f"cannot probe for {ip} on {interface}: {exc}") from None


GARP_SCHEDULE = (0.0, 0.25, 0.5, 1.25, 2.5)  # seconds after the VIP is added; later ones outlast ARP locktime


def announce(interface: str, cidr: str, schedule: Iterable[float] = GARP_SCHEDULE) -> threading.Event:
    """Send gratuitous ARP (request and reply) now and at the later times of `schedule`, in the background.

    Several rounds, as keepalived does: a neighbour that updated its entry for the VIP
    less than its locktime (1 s) ago may ignore the first ones. The rounds stop as soon
    as the VIP is no longer ours (or the returned event is set): a node that has handed
    the VIP over must never announce it again.
    """
    ip = str(ipaddress.ip_interface(cidr).ip)
    try:
        frames = arp_frames(_mac(interface), ip)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        sock.bind((interface, 0))
    except (OSError, ActuatorError) as exc:
        raise ActuatorError(f"cannot send gratuitous ARP for {ip} on {interface}: {exc}") from None
    cancelled = threading.Event()

    def send_all() -> None:
        for frame in frames:
            try:
                sock.send(frame)
            except OSError:
                pass

    times = sorted(schedule)
    started = time.monotonic()

    def repeat() -> None:
        try:
            for at in times[1:]:
                if cancelled.wait(max(0.0, started + at - time.monotonic())) or not present(interface, cidr):
                    return
                send_all()
        finally:
            sock.close()

    send_all()
    threading.Thread(target=repeat, name="etcdha-garp", daemon=True).start()
    return cancelled
