"""IPv6 VIPs (2001:2::/48, the benchmarking range): failover with the invariant sampled, an unsolicited
neighbour advertisement seen by the client, and no VIP added that another host already answers for."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import lab as L
import pytest
from lab import PORT, VIP6, sample_service_command, wait_until

pytestmark = pytest.mark.e2e

# in the client namespace: every neighbour advertisement for the VIP, as "monotonic-time sender-mac" lines
LISTEN = f"""
import ipaddress, socket, sys, time
target = ipaddress.IPv6Address({VIP6!r}).packed
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
s.bind(("eth0", 0))
print("ready", flush=True)
while True:
    f = s.recv(2048)
    if len(f) >= 78 and f[20] == 58 and f[54] == 136 and f[62:78] == target:
        print(time.monotonic(), f[6:12].hex(), flush=True)
"""


def web6(*extra: str) -> dict:
    return {"services": {"web": {"command": sample_service_command("web", PORT, *extra), "vip": f"{VIP6}/64",
                                 "interface": "eth0"}}}


def mac_of(lab, node: str) -> str:
    """eth0's MAC in the node's namespace, as hex (ip, not /sys: nsenter --net keeps the host's /sys)."""
    out = lab.run(node, ["ip", "-j", "link", "show", "eth0"]).stdout
    return json.loads(out)[0]["address"].replace(":", "")


class Advertisements:
    def __init__(self, lab):
        self.proc = lab.popen("cl", [sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.seen: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, mac = line.split()
            self.seen.append((float(t), mac))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def test_an_ipv6_vip_fails_over_with_a_neighbour_advertisement(make_cluster, lab):
    ads = Advertisements(lab)
    probe = L.Probe(lab, url=f"http://[{VIP6}]:{PORT}/")
    try:
        with L.Sampler(lab, services={"web": VIP6}) as sampler:
            cluster = make_cluster(web6())
            wait_until(lambda: sampler.holder() == "n1", 30, "n1 to hold the IPv6 VIP and web")
            wait_until(lambda: probe.last() == "n1", 10, "the IPv6 VIP to answer from n1")
            wait_until(lambda: any(mac == mac_of(lab, "n1") for _, mac in ads.seen), 5,
                       "n1's unsolicited neighbour advertisement")
            t0 = time.monotonic()
            cluster.nodes["n1"].signal(signal.SIGKILL)
            wait_until(lambda: probe.first_answer_after(t0, exclude="n1"), 10, "n2 to answer on the IPv6 VIP")
            assert sampler.holder() == "n2"
            n2 = mac_of(lab, "n2")
            wait_until(lambda: any(t > t0 and mac == n2 for t, mac in ads.seen), 5,
                       "n2's neighbour advertisement after the takeover")
            wait_until(lambda: len([1 for t, mac in ads.seen if t > t0 and mac == n2]) >= 3, 5,
                       "further rounds of advertisements, as for gratuitous ARP")
            assert not lab.vip_on("n1", VIP6)
            assert sampler.violations == []
    finally:
        probe.stop()
        ads.stop()


def test_an_ipv6_vip_another_host_answers_for_is_never_added(make_cluster, lab):
    assert lab.run("cl", ["ip", "addr", "add", f"{VIP6}/64", "dev", "eth0", "nodad"]).returncode == 0
    try:
        with L.Sampler(lab, services={"web": VIP6}) as sampler:
            cluster = make_cluster({**web6(), "failure_cooldown": 60})
            wait_until(lambda: any(e["event"] == "failed" for e in history(cluster)), 30,
                       "n1 to refuse the VIP the client already has")
            failed = next(e for e in history(cluster) if e["event"] == "failed")
            client = mac_of(lab, "cl")
            assert "already answered" in failed["reason"] and ":".join(
                client[i:i + 2] for i in range(0, 12, 2)) in failed["reason"], failed
            assert not any(lab.vip_on(n, VIP6) for n in lab.node_names)
            assert sampler.violations == []
    finally:
        lab.run("cl", ["ip", "addr", "del", f"{VIP6}/64", "dev", "eth0"])


def history(cluster) -> list[dict]:
    res = cluster.cli("history", "web", "--json")
    return json.loads(res.stdout) if res.returncode == 0 else []
