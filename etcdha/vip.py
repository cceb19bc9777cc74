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
    return add_many(interface, [cidr])[cidr] is True


def add_many(interface: str, cidrs: Iterable[str]) -> dict[str, object]:
    """Add several VIPs over one netlink socket: cidr -> True (added), False (was there) or the error."""
    done: dict[str, object] = {}
    with IPRoute() as ipr:
        idx = _index(ipr, interface)
        for cidr in cidrs:
            vip = ipaddress.ip_interface(cidr)
            try:
                ipr.addr("add", index=idx, address=str(vip.ip), prefixlen=vip.network.prefixlen,
                         broadcast=str(vip.network.broadcast_address), label=(interface + LABEL_SUFFIX)[:15])
                done[cidr] = True
            except NetlinkError as exc:
                done[cidr] = False if exc.code == errno.EEXIST else ActuatorError(
                    f"cannot add {cidr} to {interface}: {exc}")
    return done


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
    """Ask the link whether another host already answers for the VIP; its MAC if so."""
    ip = str(ipaddress.ip_interface(cidr).ip)
    return in_use_elsewhere_many(interface, [ip], timeout).get(ip)


def in_use_elsewhere_many(interface: str, ips: Iterable[str], timeout: float = 0.05) -> dict[str, str]:
    """Probe every address at once (RFC 5227, two rounds) and listen `timeout` s: ip -> MAC of a host answering.

    Run before adding VIPs we do not have, so a VIP configured on some other machine
    (or a node that escaped fencing) is never duplicated. One socket and one wait for
    all of them: a takeover of many services costs one probe window, not one each.
    """
    wanted = {socket.inet_aton(ip): ip for ip in ips}
    if not wanted:
        return {}
    found: dict[str, str] = {}
    try:
        mac = _mac(interface)
        frames = [probe_frame(mac, ip) for ip in wanted.values()]
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
            sock.bind((interface, 0))
            deadline = time.monotonic() + timeout
            rounds = 0
            for _ in range(100000):  # bounded by the deadline below
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if rounds < 2 and left <= timeout * (1 - rounds / 2):
                    for frame in frames:
                        sock.send(frame)
                    rounds += 1
                sock.settimeout(min(left, timeout / 2))
                try:
                    frame = sock.recv(128)
                except socket.timeout:
                    continue
                if len(frame) >= 42 and frame[28:32] in wanted:
                    sender = reply_sender(frame, wanted[frame[28:32]], mac)
                    if sender:
                        found[wanted[frame[28:32]]] = sender
    except OSError as exc:
        raise ActuatorError(f"cannot probe for {', '.join(wanted.values())} on {interface}: {exc}") from None
    return found


GARP_SCHEDULE = (0.0, 0.25, 0.5, 1.25, 2.5)  # seconds after the VIP is added; later ones outlast ARP locktime


class Announcer:
    """Sends gratuitous ARP (request and reply) for every VIP we add, on GARP_SCHEDULE, from one thread.

    Several rounds, as keepalived does: a neighbour that updated its entry for the VIP
    less than its locktime (1 s) ago may ignore the first ones. A VIP's rounds stop as
    soon as it is no longer ours (or its event is set): a node that has handed the VIP
    over must never announce it again. One thread and one socket per interface for
    all VIPs, however many are taken over at once.
    """

    def __init__(self, schedule: Iterable[float] = GARP_SCHEDULE):
        self.schedule = sorted(schedule)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: list[tuple[float, int, str, str, threading.Event]] = []  # (due, round, interface, cidr, cancel)
        self._thread: Optional[threading.Thread] = None

    def announce(self, interface: str, cidr: str) -> threading.Event:
        """Announce now (in the caller) and at the later rounds (in the background); set the event to stop."""
        return self.announce_many(interface, [cidr])[cidr]

    def announce_many(self, interface: str, cidrs: list[str]) -> dict[str, threading.Event]:
        """`announce` for several VIPs of one interface: one socket for the first round."""
        events = {cidr: threading.Event() for cidr in cidrs}
        self._send(interface, cidrs)
        with self._lock:
            started = time.monotonic()
            for cidr, cancelled in events.items():
                for i, at in enumerate(self.schedule[1:], 1):
                    self._pending.append((started + at, i, interface, cidr, cancelled))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="etcdha-garp", daemon=True)
                self._thread.start()
        self._wake.set()
        return events

    def _send(self, interface: str, cidrs: list[str]) -> None:
        try:
            mac = _mac(interface)
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
                sock.bind((interface, 0))
                for cidr in cidrs:
                    for frame in arp_frames(mac, str(ipaddress.ip_interface(cidr).ip)):
                        try:
                            sock.send(frame)
                        except OSError:
                            pass
        except (OSError, ActuatorError) as exc:
            raise ActuatorError(f"cannot send gratuitous ARP on {interface} for {', '.join(cidrs)}: {exc}") from None

    def _run(self) -> None:
        for _ in range(10_000_000):  # bounded; exits when nothing is pending
            with self._lock:
                self._pending = [p for p in self._pending if not p[4].is_set()]
                if not self._pending:
                    self._thread = None
                    return
                now = time.monotonic()
                due = [p for p in self._pending if p[0] <= now]
                self._pending = [p for p in self._pending if p[0] > now]
                wait = min((p[0] for p in self._pending), default=now + 0.5) - now
            by_interface: dict[str, list[str]] = {}
            for _, _, interface, cidr, _ in due:
                by_interface.setdefault(interface, []).append(cidr)
            for interface, cidrs in by_interface.items():
                try:
                    up = {a.split("/")[0] for a in addresses(interface)}  # one dump for all of its VIPs
                    mine = [c for c in cidrs if str(ipaddress.ip_interface(c).ip) in up]
                    if mine:
                        self._send(interface, mine)
                except ActuatorError:
                    pass
            self._wake.wait(max(0.0, wait))
            self._wake.clear()


_ANNOUNCER = Announcer()


def announce(interface: str, cidr: str) -> threading.Event:
    """Gratuitous ARP for `cidr` now and on GARP_SCHEDULE (see Announcer); set the event to stop."""
    return _ANNOUNCER.announce(interface, cidr)


def announce_many(interface: str, cidrs: list[str]) -> dict[str, threading.Event]:
    return _ANNOUNCER.announce_many(interface, cidrs)
