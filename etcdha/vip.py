"""Virtual IPs: netlink add/remove/list (`netlink`, stdlib), gratuitous ARP and, for IPv6, unsolicited neighbour
advertisements (both as raw frames on a packet socket).

Used by the agent and by the fence process, so it imports nothing that starts
threads or gRPC. Everything acts on the network namespace of the calling process.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from typing import Callable, Iterable, Optional

from etcdha import netlink
from etcdha.errors import ActuatorError, ConfigError

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
# Label put on every VIP we add, so `ip addr` shows who put it there.
LABEL_SUFFIX = ":ha"


def _index(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise ActuatorError(f"interface {interface!r} does not exist in this network namespace") from None


def ips(interface: str) -> set[str]:
    """Every IPv4 and IPv6 address on `interface` (IPv6 compressed, like ipaddress): two netlink dumps."""
    index = _index(interface)
    try:
        return netlink.addresses(socket.AF_INET).get(index, set()) | netlink.addresses(socket.AF_INET6).get(index, set())
    except OSError as exc:
        raise ActuatorError(f"cannot list the addresses of {interface}: {exc}") from None


def present(interface: str, cidr: str) -> bool:
    try:
        return str(ipaddress.ip_interface(cidr).ip) in ips(interface)
    except ActuatorError:
        return False


def add(interface: str, cidr: str) -> bool:
    """Add the VIP; True if it was added, False if it was already there."""
    return add_many(interface, [cidr])[cidr] is True


def add_many(interface: str, cidrs: Iterable[str]) -> dict[str, object]:
    """Add several VIPs over one netlink socket: cidr -> True (added), False (was there) or an ActuatorError.

    IPv4 ones carry the label INTERFACE:ha (so `ip addr` shows who put them there); IPv6
    ones skip duplicate address detection (we probed before), so they are usable at once.
    """
    cidrs = list(cidrs)
    _index(interface)
    try:
        done = netlink.add_addresses(interface, cidrs, (interface + LABEL_SUFFIX)[:15])
    except OSError as exc:
        raise ActuatorError(f"cannot add {', '.join(cidrs)} to {interface}: {exc}") from None
    return {cidr: ActuatorError(str(result)) if isinstance(result, OSError) else result
            for cidr, result in done.items()}


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
    _index(interface)
    try:
        return netlink.hardware_address(interface)
    except OSError as exc:
        raise ActuatorError(f"cannot read the MAC address of {interface}: {exc}") from None


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
    """Probe every address at once and listen `timeout` s: ip -> MAC of a host answering for it.

    IPv4: RFC 5227 ARP probes; IPv6: duplicate-address-detection neighbour solicitations
    (from ::, to the solicited-node group; a host owning the address answers with a
    neighbour advertisement). Two rounds each. Run before adding VIPs we do not have, so a
    VIP configured on some other machine (or a node that escaped fencing) is never
    duplicated. One socket per family and one wait for all: a takeover of many services
    costs one probe window, not one each.
    """
    ips = list(ips)
    v4 = [ip for ip in ips if ipaddress.ip_address(ip).version == 4]
    v6 = [ip for ip in ips if ipaddress.ip_address(ip).version == 6]
    if not ips:
        return {}
    found: dict[str, str] = {}
    try:
        mac = _mac(interface)
        if v4:
            wanted4 = {socket.inet_aton(ip): ip for ip in v4}
            found.update(_probe(interface, ETH_P_ARP, [probe_frame(mac, ip) for ip in v4], timeout,
                                lambda f: (reply_sender(f, wanted4[f[28:32]], mac), wanted4[f[28:32]])
                                if len(f) >= 42 and f[28:32] in wanted4 else (None, "")))
        if v6:
            wanted6 = {ipaddress.IPv6Address(ip).packed: str(ipaddress.IPv6Address(ip)) for ip in v6}
            found.update(_probe(interface, ETH_P_IPV6, [dad_probe_frame(mac, ip) for ip in v6], timeout,
                                lambda f: (na_sender(f, mac), wanted6[f[62:78]])
                                if len(f) >= 78 and f[62:78] in wanted6 else (None, "")))
    except OSError as exc:
        raise ActuatorError(f"cannot probe for {', '.join(ips)} on {interface}: {exc}") from None
    return found


def _probe(interface: str, proto: int, frames: list[bytes], timeout: float,
           match: "Callable[[bytes], tuple[Optional[str], str]]") -> dict[str, str]:
    """Send `frames` twice within `timeout` and collect (ip -> sender MAC) from what `match` recognises."""
    found: dict[str, str] = {}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto)) as sock:
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
                frame = sock.recv(256)
            except socket.timeout:
                continue
            sender, ip = match(frame)
            if sender:
                found[ip] = sender
    return found


# ---- IPv6: neighbour discovery frames (RFC 4861), built whole so no kernel state is involved ----------

ALL_NODES = ipaddress.IPv6Address("ff02::1")
UNSPECIFIED = ipaddress.IPv6Address("::")


def solicited_node(ip: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX: the group a host owning `ip` listens on for solicitations."""
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | (int(ip) & 0xFFFFFF))


def _multicast_mac(ip: ipaddress.IPv6Address) -> bytes:
    return b"\x33\x33" + ip.packed[-4:]


def icmp6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """The ICMPv6 checksum over the IPv6 pseudo-header and `message` (its checksum field zero)."""
    data = src + dst + struct.pack("!I3xB", len(message), 58) + message
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ndp_frame(src_mac: bytes, dst_mac: bytes, src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address,
               message: bytes) -> bytes:
    checksum = icmp6_checksum(src.packed, dst.packed, message)
    message = message[:2] + struct.pack("!H", checksum) + message[4:]
    ip6 = struct.pack("!IHBB", 0x60000000, len(message), 58, 255) + src.packed + dst.packed  # hop limit 255: NDP
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6) + ip6 + message


def na_frame(mac: bytes, ip: str) -> bytes:
    """An unsolicited neighbour advertisement for `ip` to all nodes (override set, with our link-layer address):
    the IPv6 counterpart of gratuitous ARP, from the VIP itself."""
    vip = ipaddress.IPv6Address(ip)
    message = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + vip.packed + struct.pack("!BB", 2, 1) + mac
    return _ndp_frame(mac, _multicast_mac(ALL_NODES), vip, ALL_NODES, message)


def dad_probe_frame(mac: bytes, ip: str) -> bytes:
    """A duplicate-address-detection solicitation for `ip` (from ::, so no neighbour cache learns from it)."""
    vip = ipaddress.IPv6Address(ip)
    group = solicited_node(vip)
    message = struct.pack("!BBHI", 135, 0, 0, 0) + vip.packed
    return _ndp_frame(mac, _multicast_mac(group), UNSPECIFIED, group, message)


def na_sender(frame: bytes, own_mac: bytes) -> Optional[str]:
    """The sender's MAC if `frame` is a neighbour advertisement from another host (its target: frame[62:78])."""
    if len(frame) < 78 or frame[12:14] != struct.pack("!H", ETH_P_IPV6) or frame[20] != 58 or frame[54] != 136:
        return None
    sender = frame[6:12]
    return None if sender == own_mac else ":".join(f"{b:02x}" for b in sender)


GARP_SCHEDULE = (0.0, 0.25, 0.5, 1.25, 2.5)  # seconds after the VIP is added; later ones outlast ARP locktime


class Announcer:
    """Sends gratuitous ARP (request and reply; an unsolicited NA for IPv6) for every VIP we add, on
    GARP_SCHEDULE, from one thread.

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
        """Gratuitous ARP (request and reply) for IPv4 VIPs, an unsolicited neighbour advertisement for IPv6 ones."""
        try:
            mac = _mac(interface)
            frames = []
            for cidr in cidrs:
                vip = ipaddress.ip_interface(cidr).ip
                frames += arp_frames(mac, str(vip)) if vip.version == 4 else [na_frame(mac, str(vip))]
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind((interface, 0))
                for frame in frames:
                    try:
                        sock.send(frame)
                    except OSError:
                        pass
        except (OSError, ActuatorError) as exc:
            raise ActuatorError(f"cannot announce {', '.join(cidrs)} on {interface}: {exc}") from None

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
                    up = ips(interface)  # one dump for all of its VIPs
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
