"""Pure containment rules: where the cgroup subtree goes, the netlink delete request, history key ownership."""
from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from etcdha import cgroup, model, netlink
from etcdha.errors import ConfigError

pytestmark = pytest.mark.unit

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
V1_ONLY = "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"


@pytest.mark.parametrize("mounts, expected", [
    (HYBRID, Path("/sys/fs/cgroup/unified")),
    (UNIFIED, Path("/sys/fs/cgroup")),
    (V1_ONLY, None),
    ("", None),
])
def test_cgroup2_mount_from_proc_mounts(mounts, expected):
    assert cgroup.cgroup2_mount(mounts) == expected


@pytest.mark.parametrize("text, expected", [
    ("0::/system.slice/etcdha.service\n", "/system.slice/etcdha.service"),
    ("9:name=systemd:/system.slice/etcdha.service\n0::/system.slice/etcdha.service\n",
     "/system.slice/etcdha.service"),
    ("0::/\n", "/"),
    ("4:memory:/x\n", None),  # cgroup v1 only
])
def test_own_cgroup_from_proc_self_cgroup(text, expected):
    assert cgroup.own_cgroup(text) == expected


MOUNT = Path("/sys/fs/cgroup")
UNIT = "/system.slice/etcdha.service"


@pytest.mark.parametrize("configured, own, under_systemd, delegated, root, moves_to", [
    # the config wins, whatever else is true
    (Path("/sys/fs/cgroup/ha/n1"), UNIT, True, True, Path("/sys/fs/cgroup/ha/n1"), None),
    # systemd with Delegate=yes: the unit's cgroup, the agent moves to a leaf of its own
    (None, UNIT, True, True, MOUNT / "system.slice/etcdha.service", MOUNT / "system.slice/etcdha.service/agent"),
    # systemd without delegation, or no systemd at all: a subtree of the mount named after the node
    (None, UNIT, True, False, MOUNT / "etcdha/n1", None),
    (None, "/user.slice/session-1.scope", False, False, MOUNT / "etcdha/n1", None),
    (None, "/", False, False, MOUNT / "etcdha/n1", None),
])
def test_placement(configured, own, under_systemd, delegated, root, moves_to):
    placed = cgroup.choose_placement(configured, MOUNT, own, under_systemd, delegated, "n1")
    assert (placed.root, placed.move_self_to) == (root, moves_to)
    assert placed.why


def test_no_cgroup2_is_a_clear_refusal_not_a_fallback():
    with pytest.raises(ConfigError, match="no cgroup v2 hierarchy is mounted"):
        cgroup.choose_placement(None, None, None, False, False, "n1")


@pytest.mark.parametrize("cidr, family, prefixlen, attrs", [
    ("198.18.0.100/24", socket.AF_INET, 24, [(2, bytes([198, 18, 0, 100])), (1, bytes([198, 18, 0, 100]))]),
    ("2001:2::5/64", socket.AF_INET6, 64, [(1, socket.inet_pton(socket.AF_INET6, "2001:2::5"))]),
])
def test_netlink_delete_request(cidr, family, prefixlen, attrs):
    msg = netlink.delete_request(7, cidr, seq=42)
    length, kind, flags, seq, _pid = struct.unpack_from("IHHII", msg)
    assert (length, kind, seq) == (len(msg), netlink.RTM_DELADDR, 42)
    assert flags == netlink.NLM_F_REQUEST | netlink.NLM_F_ACK
    fam, plen, _flags, _scope, index = struct.unpack_from("BBBBI", msg, 16)
    assert (fam, plen, index) == (family, prefixlen, 7)
    found, offset = [], 24
    while offset < len(msg):
        alen, akind = struct.unpack_from("HH", msg, offset)
        found.append((akind, msg[offset + 4:offset + alen]))
        offset += (alen + 3) & ~3
    assert found == attrs


@pytest.mark.parametrize("segment, ours", [
    ("01795687228968279-n1", True),
    ("01795687228968279-node.a_b-c", True),
    ("nodes", False),                       # a nested cluster's key segment
    ("01795687228968279-n1/x", False),
    ("1795687228968279-n1", False),         # 16 digits: not what we write
    ("01795687228968279-", False),
])
def test_history_pruning_recognises_only_its_own_keys(segment, ours):
    assert model.is_history_id(segment) is ours


def test_history_id_is_what_pruning_recognises():
    event = model.Event("web", 1795687228.968279, "n1", "claimed", "vacant", 3)
    assert model.is_history_id(model.history_id(event))


def test_no_handoff_unless_the_node_is_verified_clean():
    """revoke_if_clean never talks to etcd when processes survive or a VIP could not be removed."""
    from etcdha.fence import revoke_if_clean

    etcd = {"endpoints": ["http://198.18.255.254:1"], "timeout": 0.01}  # must never be contacted
    assert "not handing lease" in revoke_if_clean(etcd, 0xAB, empty=False, vip_errors=[])
    assert "not handing lease" in revoke_if_clean(etcd, 0xAB, empty=True, vip_errors=["EPERM"])
    assert revoke_if_clean(etcd, 0, empty=True, vip_errors=[]) == "no lease to hand over"
    assert revoke_if_clean(None, 0xAB, empty=True, vip_errors=[]) == "no lease to hand over"


@pytest.mark.parametrize("removed, expected", [
    ([], "no VIPs"),
    (["198.18.1.1/24 on eth0"], "1 VIP (198.18.1.1/24 on eth0)"),
    ([f"198.18.1.{i}/24 on eth0" for i in range(1, 5)],
     "4 VIPs (198.18.1.1/24 on eth0, 198.18.1.2/24 on eth0, 198.18.1.3/24 on eth0, 198.18.1.4/24 on eth0)"),
    ([f"198.18.1.{i}/24 on eth0" for i in range(1, 85)],
     "84 VIPs (198.18.1.1/24 on eth0, 198.18.1.2/24 on eth0, 198.18.1.3/24 on eth0, 198.18.1.4/24 on eth0 "
     "and 80 more)"),
])
def test_fence_names_a_few_removed_vips_and_counts_the_rest(removed, expected):
    """At hundreds of services the fence's one line must stay a line."""
    from etcdha.fence import listed

    assert listed(removed) == expected


def test_descendants_walk_finds_the_same_tree_as_the_stat_scan():
    """The children-file walk (the fence's fast path) and the /proc/PID/stat scan agree on a real tree,
    grandchildren and a process that left its parent's session included."""
    import os
    import subprocess
    import sys

    from etcdha.fence import _descendants_from_stat, descendants

    script = ("import subprocess, sys, time\n"
              "kids = [subprocess.Popen(['sleep', '30']) for _ in range(3)]\n"
              "kids.append(subprocess.Popen(['setsid', 'sleep', '30']))\n"
              "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
              "time.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    grandchildren: set[int] = set()
    try:
        grandchildren = {int(p) for p in parent.stdout.readline().split()}
        assert len(grandchildren) == 4
        walked = descendants(os.getpid())
        assert parent.pid in walked and grandchildren <= set(walked)
        assert sorted(walked) == sorted(_descendants_from_stat(os.getpid(), 64))
        assert sorted(descendants(os.getpid(), 1)) == sorted(_descendants_from_stat(os.getpid(), 1))
        assert parent.pid in descendants(os.getpid(), 1) and not grandchildren & set(descendants(os.getpid(), 1))
    finally:
        parent.kill()
        parent.wait(5)
        for pid in grandchildren:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
