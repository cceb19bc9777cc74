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
