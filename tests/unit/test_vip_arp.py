"""vip.arp_frames: gratuitous ARP request and reply bytes (no socket, no root)."""
from __future__ import annotations

import socket
import struct

import pytest

from etcdha import vip

pytestmark = pytest.mark.unit

MAC = bytes.fromhex("02005e0001aa")
IP = "198.18.0.100"
BCAST = b"\xff" * 6


def parse(frame: bytes) -> dict:
    dst, src, ethertype = frame[0:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    sha, spa, tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
    return dict(dst=dst, src=src, ethertype=ethertype, htype=htype, ptype=ptype, hlen=hlen, plen=plen,
                op=op, sha=sha, spa=socket.inet_ntoa(spa), tha=tha, tpa=socket.inet_ntoa(tpa))


def test_two_frames_request_then_reply():
    frames = vip.arp_frames(MAC, IP)
    assert len(frames) == 2
    assert [parse(f)["op"] for f in frames] == [1, 2]


@pytest.mark.parametrize("index", [0, 1])
def test_frame_layout(index):
    frame = vip.arp_frames(MAC, IP)[index]
    assert len(frame) == 42
    f = parse(frame)
    assert f["dst"] == BCAST
    assert f["src"] == MAC
    assert f["ethertype"] == 0x0806 == vip.ETH_P_ARP
    assert (f["htype"], f["ptype"], f["hlen"], f["plen"]) == (1, 0x0800, 6, 4)
    assert f["sha"] == MAC
    assert f["spa"] == IP and f["tpa"] == IP  # gratuitous: sender and target IP are the VIP


def test_target_hardware_addresses():
    request, reply = (parse(f) for f in vip.arp_frames(MAC, IP))
    assert request["tha"] == b"\x00" * 6
    assert reply["tha"] == BCAST


def test_other_address():
    frames = vip.arp_frames(b"\xaa\xbb\xcc\xdd\xee\xff", "10.1.2.3")
    assert all(parse(f)["spa"] == "10.1.2.3" == parse(f)["tpa"] for f in frames)
    assert all(parse(f)["sha"] == b"\xaa\xbb\xcc\xdd\xee\xff" for f in frames)


# ---- IPv6: neighbour discovery frames --------------------------------------------------------------

OURS, THEIRS = bytes.fromhex("020000000001"), bytes.fromhex("02000000abcd")


def test_unsolicited_neighbour_advertisement_frame():
    import ipaddress

    f = vip.na_frame(OURS, "2001:2::100")
    assert f[:6] == bytes.fromhex("333300000001") and f[6:12] == OURS and f[12:14] == b"\x86\xdd"
    assert f[18:20] == (len(f) - 54).to_bytes(2, "big") and f[20] == 58 and f[21] == 255  # ICMPv6, hop limit 255
    assert f[22:38] == ipaddress.IPv6Address("2001:2::100").packed  # from the VIP itself
    assert f[38:54] == ipaddress.IPv6Address("ff02::1").packed      # to all nodes
    assert f[54] == 136 and f[55] == 0 and f[58] & 0xE0 == 0x20      # NA; override, not solicited, not router
    assert f[62:78] == ipaddress.IPv6Address("2001:2::100").packed
    assert f[78:80] == b"\x02\x01" and f[80:86] == OURS              # target link-layer address option
    assert vip.icmp6_checksum(f[22:38], f[38:54], f[54:]) == 0       # a valid checksum sums to zero


def test_duplicate_address_probe_frame():
    import ipaddress

    f = vip.dad_probe_frame(OURS, "2001:2::1:2:100")
    group = ipaddress.IPv6Address("ff02::1:ff02:100")
    assert f[:6] == bytes.fromhex("3333ff020100") and f[21] == 255
    assert f[22:38] == bytes(16) and f[38:54] == group.packed       # from ::, to the solicited-node group
    assert f[54] == 135 and f[62:78] == ipaddress.IPv6Address("2001:2::1:2:100").packed and len(f) == 78
    assert vip.icmp6_checksum(f[22:38], f[38:54], f[54:]) == 0


def test_an_advertisement_from_another_host_names_its_mac_ours_and_others_do_not():
    assert vip.na_sender(vip.na_frame(THEIRS, "2001:2::100"), OURS) == "02:00:00:00:ab:cd"
    assert vip.na_sender(vip.na_frame(OURS, "2001:2::100"), OURS) is None
    assert vip.na_sender(vip.dad_probe_frame(THEIRS, "2001:2::100"), OURS) is None  # a solicitation, not an answer
    assert vip.na_sender(b"\x00" * 40, OURS) is None
