"""VIP hygiene: leftovers from a crash are removed; a VIP answered by a foreign host is never duplicated."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from lab import VIP, wait_until

pytestmark = pytest.mark.e2e


def test_leftover_vip_is_removed_at_start(lab, make_cluster, sampler, probe):
    lab.run("n2", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])  # as if n2 had crashed holding it
    assert lab.vip_on("n2")
    cluster = make_cluster()
    wait_until(lambda: not lab.vip_on("n2"), 15, "n2's agent to remove the leftover VIP")
    wait_until(lambda: sampler.holder() == "n1", 30, "n1 to hold the service")
    assert "removed leftover VIP" in cluster.nodes["n2"].log.read_text()
    assert sampler.violations == []


def test_vip_answered_by_a_foreign_host_is_not_duplicated(lab, make_cluster, sampler, probe):
    lab.run("cl", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])  # some other machine has the address
    try:
        cluster = make_cluster({"failure_cooldown": 3})
        wait_until(lambda: "already answered" in cluster.nodes["n1"].log.read_text(), 30,
                   "n1 to detect the address conflict")
        time.sleep(1)
        assert not any(lab.vip_on(n) for n in lab.node_names), "no node may add a VIP that answers elsewhere"
    finally:
        lab.run("cl", ["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"])
    # once the foreign address is gone, the cluster takes the service (after the cooldown)
    wait_until(lambda: sampler.holder() is not None, 30, "a node to take the service once the conflict is gone")
    wait_until(lambda: probe.last() is not None, 10, "the VIP to answer")
    assert sampler.violations == []


def test_removing_one_vip_never_removes_another_of_the_same_foreign_subnet(lab, make_cluster):
    """Two VIPs in a subnet that is not the node's own: the first added is the subnet's primary
    address, and with the kernel's default (promote_secondaries=0) deleting it deletes the other."""
    import lab as L

    foreign = "198.18.1"
    services = {name: {"command": L.sample_service_command(name, 8080 + i), "vip": f"{foreign}.{100 + i}/24",
                       "interface": "eth0"} for i, name in enumerate(("web", "api"))}
    for node in lab.node_names:  # the kernel's default, whatever an earlier test's agent set in this namespace
        lab.run(node, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/conf/eth0/promote_secondaries"])
    with L.Sampler(lab, services={"web": f"{foreign}.100", "api": f"{foreign}.101"}) as sampler:
        cluster = make_cluster({"services": services})
        wait_until(lambda: sampler.holders() == {"web": "n1", "api": "n1"}, 40, "n1 to run both")
        # move the service whose VIP the kernel made the subnet's primary address; watch the other one
        shown = lab.run("n1", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        primary = next(line.split()[3] for line in shown.splitlines() if f" {foreign}." in line and "secondary" not in line)
        moving, staying = ("web", "api") if primary == f"{foreign}.100/24" else ("api", "web")
        other = f"{foreign}.{100 if staying == 'web' else 101}"
        lost: list[float] = []
        watching = True

        def watch() -> None:  # the other VIP, sampled fast while the primary one is removed
            for _ in range(20000):
                if not watching:
                    return
                if not lab.vip_on("n1", other):
                    lost.append(time.monotonic())
                time.sleep(0.002)

        import threading
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        res = cluster.cli("move", moving, "--to", "n2", "--wait", "--timeout", "20")
        time.sleep(1)
        watching = False
        t.join(5)
        assert res.returncode == 0, res.stderr
        assert sampler.holders() == {moving: "n2", staying: "n1"}
        assert lost == [], f"{staying}'s VIP vanished from n1 {len(lost)} times while {moving}'s was removed"
        assert "promote_secondaries=1" in cluster.nodes["n1"].log.read_text()
        assert sampler.violations == []


ARP_LISTENER = r"""
import socket, struct, sys, time
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
sock.bind(("eth0", 0))
sock.settimeout(0.2)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        f = sock.recv(128)
    except socket.timeout:
        continue
    op = struct.unpack("!H", f[20:22])[0]
    print(f"{time.monotonic():.3f} {op} {f[22:28].hex()} {socket.inet_ntoa(f[28:32])} {socket.inet_ntoa(f[38:42])}",
          flush=True)
"""


def test_the_new_owner_announces_the_vip_in_rounds_and_the_old_one_stays_silent(lab, make_cluster, sampler, probe):
    import subprocess
    import sys

    from lab import VIP

    cluster = make_cluster()
    wait_until(lambda: sampler.holder() == "n1", 30, "n1 to hold web")
    macs = {n: lab.run(n, ["ip", "-o", "link", "show", "dev", "eth0"]).stdout.split("link/ether ")[1].split()[0]
            .replace(":", "") for n in ("n1", "n2")}
    listener = lab.popen("cl", [sys.executable, "-c", ARP_LISTENER, "6"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    t0 = time.monotonic()
    res = cluster.cli("move", "web", "--to", "n2", "--wait", "--timeout", "20")
    assert res.returncode == 0, res.stderr
    out, _ = listener.communicate(timeout=20)
    # gratuitous: sender IP == target IP == the VIP (requests and replies alike)
    garps = [line.split() for line in out.splitlines() if line.split()[3:5] == [VIP, VIP]]
    by_n2 = sorted(float(t) for t, _, mac, _, _ in garps if mac == macs["n2"] and float(t) > t0)
    assert {op for _, op, mac, _, _ in garps if mac == macs["n2"]} == {"1", "2"}, "requests and replies"
    rounds = [t for i, t in enumerate(by_n2) if i == 0 or t - by_n2[i - 1] > 0.1]
    assert len(rounds) >= 4, f"expected the rounds of the schedule (0, 0.25, 0.5, 1.25, 2.5 s), got {rounds}"
    assert rounds[-1] - rounds[0] >= 2.0
    assert not [g for g in garps if g[2] == macs["n1"] and float(g[0]) > t0 + 0.5], "n1 announced after handing over"
    assert sampler.violations == []


AHEAD = """
import json, sys, time
sys.path.insert(0, {root!r})
from etcdha import actuator
probe = actuator.AheadProbe({{"eth0": [{taken!r}, {free!r}]}})
probe.start()
now = probe.answers("eth0", [{taken!r}, {free!r}, "198.18.0.251"])
time.sleep(actuator.PROBE_FRESH + 0.3)
print(json.dumps({{"now": now, "later": probe.answers("eth0", [{taken!r}])}}))
"""


def test_a_probe_made_while_claiming_finds_a_foreign_vip_and_goes_stale(lab):
    """The VIPs of a takeover are probed beside the claims (actuator.AheadProbe); a host answering for
    one is found as by the probe right before the add, and an old answer is not trusted."""
    taken, free = "198.18.0.250", "198.18.0.249"
    lab.run("cl", ["ip", "addr", "add", f"{taken}/24", "dev", "eth0"])  # some other machine has the address
    try:
        code = AHEAD.format(root=str(Path(__file__).resolve().parents[2]), taken=taken, free=free)
        res = lab.run(lab.node_names[0], [sys.executable, "-I", "-c", code])
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        link = lab.run("cl", ["ip", "-o", "link", "show", "eth0"]).stdout
        mac = link.split("link/ether ")[1].split()[0]
        assert got["now"] == {taken: mac, free: ""}, "the foreign host by its MAC, nobody for the free one; "\
                                                      "an address it did not probe is not answered for"
        assert got["later"] is None, "an answer older than PROBE_FRESH is not trusted (the start probes again)"
    finally:
        lab.run("cl", ["ip", "addr", "del", f"{taken}/24", "dev", "eth0"])
