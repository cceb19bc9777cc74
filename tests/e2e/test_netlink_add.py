"""netlink.add_addresses and hardware_address against the real kernel, in a lab namespace: what `ip` shows after."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DUMMY = "ehnl0"  # one end of a veth pair made in the node's namespace (no dummy module here)
ADDED = ["198.18.200.1/24", "198.18.200.2/24", "2001:2:0:200::1/64"]

CODE = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from etcdha import netlink, vip
first = netlink.add_addresses({DUMMY!r}, {ADDED!r}, {DUMMY + ':ha'!r})
again = vip.add_many({DUMMY!r}, {ADDED!r})
try:
    netlink.add_addresses("nosuch0", ["198.18.200.3/24"])
    missing = "added"
except OSError as exc:
    missing = type(exc).__name__
print(json.dumps({{"first": {{k: str(v) for k, v in first.items()}}, "again": {{k: str(v) for k, v in again.items()}},
                  "ips": sorted(vip.ips({DUMMY!r})), "mac": netlink.hardware_address({DUMMY!r}).hex(),
                  "missing": missing}}))
"""


def test_addresses_are_added_once_with_label_broadcast_and_no_dad(lab):
    node = lab.node_names[-1]
    assert lab.run(node, ["ip", "link", "add", DUMMY, "type", "veth", "peer", "name", "ehnl1"]).returncode == 0
    try:
        lab.run(node, ["ip", "link", "set", DUMMY, "up"])
        res = lab.run(node, [sys.executable, "-I", "-c", CODE])
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["first"] == {cidr: "True" for cidr in ADDED}
        assert got["again"] == {cidr: "False" for cidr in ADDED}, "an address already there is not added twice"
        assert got["missing"] == "OSError"
        assert {"198.18.200.1", "198.18.200.2", "2001:2:0:200::1"} <= set(got["ips"])
        shown = lab.run(node, ["ip", "-o", "addr", "show", "dev", DUMMY]).stdout
        v4 = next(line for line in shown.splitlines() if " 198.18.200.1/24 " in line)
        assert "brd 198.18.200.255" in v4 and v4.rstrip().split("\\")[0].split()[-1] == f"{DUMMY}:ha", v4
        v6 = next(line for line in shown.splitlines() if " 2001:2:0:200::1/64 " in line)
        assert "nodad" in v6 and "tentative" not in v6, v6
        link = lab.run(node, ["ip", "-o", "link", "show", DUMMY]).stdout
        assert got["mac"] == link.split("link/ether ")[1].split()[0].replace(":", "")
    finally:
        lab.run(node, ["ip", "link", "del", DUMMY])
