"""config.parse / config.load: defaults, the example config, and errors that name file, key path and expectation."""
from __future__ import annotations

import ipaddress
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from etcdha import config
from etcdha.errors import ConfigError

pytestmark = pytest.mark.unit

SRC = "/etc/etcdha/agent.yaml"

EXAMPLE = textwrap.dedent("""\
    # /etc/etcdha/agent.yaml
    node: node1
    etcd:
      endpoints: [http://10.0.0.5:2379, http://10.0.0.6:2379, https://10.0.0.7:2379]
      prefix: /etcdha
    lease_ttl: 2
    services:
      web:
        command: /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0
        vip: 198.18.0.100/24
        interface: eth0
        priority: 200
        environment:
          GREETING: hello
      worker:
        command: ["/usr/local/bin/worker", "--queue", "jobs"]
        priority: 50
        directory: /srv/worker
    """)


def fail(data, match: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(data, SRC)
    msg = str(info.value)
    assert msg.startswith(SRC + ": "), msg
    if match:
        assert match in msg, msg
    return msg


def svc(**kw):
    base = {"command": "/bin/true"}
    base.update(kw)
    return base


def doc(**kw):
    base = {"node": "n1", "services": {"web": svc()}}
    base.update(kw)
    return base


# ---- good configs --------------------------------------------------------------------------

def test_example_config_parses():
    cfg = config.parse(yaml.safe_load(EXAMPLE), SRC)
    assert cfg.node == "node1"
    assert cfg.source == SRC
    assert cfg.etcd.endpoints == ("http://10.0.0.5:2379", "http://10.0.0.6:2379", "https://10.0.0.7:2379")
    assert cfg.etcd.prefix == "/etcdha"
    web, worker = cfg.services["web"], cfg.services["worker"]
    assert web.command == ("/usr/bin/python3", "-m", "http.server", "8080", "--bind", "0.0.0.0")
    assert web.vip == ipaddress.IPv4Interface("198.18.0.100/24")
    assert web.interface == "eth0"
    assert web.priority == 200
    assert web.environment == {"GREETING": "hello"}
    assert worker.command == ("/usr/local/bin/worker", "--queue", "jobs")
    assert worker.vip is None and worker.interface is None
    assert worker.directory == "/srv/worker"
    assert cfg.vips == (("eth0", "198.18.0.100/24"),)


def test_example_config_loads_from_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(EXAMPLE)
    cfg = config.load(path)
    assert cfg.source == str(path)
    assert set(cfg.services) == {"web", "worker"}


def _readme_examples() -> list[str]:
    readme = Path(__file__).resolve().parents[2] / "README.md"
    if not readme.exists():
        return []
    blocks = re.findall(r"```ya?ml\n(.*?)```", readme.read_text(), flags=re.S)
    return [b for b in blocks if re.search(r"^services:", b, flags=re.M)]


def test_readme_example_configs_parse():
    examples = _readme_examples()
    if not examples:
        pytest.skip("README.md has no ```yaml block with a top-level services: key (yet)")
    for block in examples:
        cfg = config.parse(yaml.safe_load(block), "README.md")
        assert cfg.services


def test_defaults():
    cfg = config.parse({"node": "n1", "services": {"web": {"command": "/bin/true"}}}, SRC)
    assert cfg.etcd == config.EtcdConfig()
    assert cfg.etcd.endpoints == ("http://127.0.0.1:2379",)
    assert cfg.etcd.prefix == "/etcdha"
    assert cfg.etcd.timeout == 1.0
    assert cfg.lease_ttl == 2
    assert cfg.keepalive_interval == 0.5        # ttl / 4
    assert cfg.fence_margin == 0.6              # min(0.6, ttl / 3)
    assert cfg.reconcile_interval == 2.0
    assert cfg.claim_delay == 0.5
    assert cfg.failure_cooldown == 30.0
    assert cfg.run_dir == Path("/run/etcdha/n1")
    web = cfg.services["web"]
    assert (web.priority, web.startsecs, web.startretries, web.stopwaitsecs) == (100, 1, 2, 2)
    assert web.vip is None and web.interface is None and web.directory is None
    assert dict(web.environment) == {}


def test_defaults_scale_with_lease_ttl():
    cfg = config.parse(doc(lease_ttl=9), SRC)
    assert cfg.keepalive_interval == pytest.approx(2.25)
    assert cfg.fence_margin == pytest.approx(0.6)


def test_node_defaults_to_the_short_hostname(monkeypatch):
    monkeypatch.setattr(config.socket, "gethostname", lambda: "host7.example.org")
    cfg = config.parse({"services": {"web": svc()}}, SRC)
    assert cfg.node == "host7"


def test_unusable_hostname_asks_for_an_explicit_node(monkeypatch):
    monkeypatch.setattr(config.socket, "gethostname", lambda: "my host")
    msg = fail({"services": {"web": svc()}}, "node: expected a name of")
    assert "set node: explicitly" in msg and "'my host'" in msg


def test_empty_document_is_an_error():
    msg = fail(None, "(top level): expected a mapping with at least a services: section")
    assert "empty document" in msg


@pytest.mark.parametrize("services", [None, {}])
def test_no_services_is_an_error(services):
    data = {"node": "n1"} if services is None else {"node": "n1", "services": services}
    msg = fail(data, "services: expected at least one service")
    assert "does nothing" in msg


def test_single_endpoint_string_becomes_tuple():
    cfg = config.parse(doc(etcd={"endpoints": "http://10.1.1.1:2379"}), SRC)
    assert cfg.etcd.endpoints == ("http://10.1.1.1:2379",)


def test_command_string_with_quotes_is_split_like_a_shell():
    cfg = config.parse(doc(services={"web": svc(command="""/bin/sh -c 'echo "a b" $X' "two words" it\\'s""")}), SRC)
    assert cfg.services["web"].command == ("/bin/sh", "-c", 'echo "a b" $X', "two words", "it's")


def test_command_as_list_is_kept_verbatim():
    argv = ["/bin/echo", "a b", "'quoted'", '"dq"', "$HOME", "50%"]
    cfg = config.parse(doc(services={"web": svc(command=argv)}), SRC)
    assert cfg.services["web"].command == tuple(argv)


def test_environment_values_become_strings():
    cfg = config.parse(doc(services={"web": svc(environment={"PORT": 8080, "DEBUG": True})}), SRC)
    assert cfg.services["web"].environment == {"PORT": "8080", "DEBUG": "True"}


def test_explicit_timings_accepted():
    cfg = config.parse(doc(lease_ttl=6, keepalive_interval=2, fence_margin=1.5, claim_delay=0,
                           failure_cooldown=0, reconcile_interval=0.5), SRC)
    assert (cfg.lease_ttl, cfg.keepalive_interval, cfg.fence_margin) == (6, 2.0, 1.5)
    assert cfg.claim_delay == 0.0 and cfg.failure_cooldown == 0.0
    assert isinstance(cfg.keepalive_interval, float)


# ---- errors: services ----------------------------------------------------------------------

@pytest.mark.parametrize("name,shown", [("a/b", "a/b"), ("my web", "my web"), ("web\tx", "'web\\tx'"),
                                        ("-web", "-web"), ("", "''"), ("x" * 64, "x" * 64), (7, "7")])
def test_bad_service_name(name, shown):
    # names that are not plain text are shown as repr(), so an error stays one readable line
    msg = fail(doc(services={name: svc()}), f"services.{shown}: expected a name of")
    assert "no '/' or whitespace" in msg


@pytest.mark.parametrize("key", ["service", "node"])
def test_name_with_trailing_newline_rejected(key):
    data = doc(services={"web\n": svc()}) if key == "service" else doc(node="n1\n")
    with pytest.raises(ConfigError):
        config.parse(data, SRC)


def test_missing_command():
    msg = fail(doc(services={"web": {"priority": 5}}), "services.web.command")
    assert "expected a command to run" in msg


@pytest.mark.parametrize("command", ["", "   ", [], "echo 'unbalanced", 42, ["ok", 3], ["a\nb"]])
def test_bad_command(command):
    fail(doc(services={"web": svc(command=command)}), "services.web.command: expected")


@pytest.mark.parametrize("vip", ["nonsense", "198.18.0.300/24", "198.18.0.1/33"])
def test_bad_vip(vip):
    msg = fail(doc(services={"web": svc(vip=vip, interface="eth0")}), "services.web.vip: expected an address")
    assert repr(vip) in msg


def test_vip_without_prefix_length():
    fail(doc(services={"web": svc(vip="198.18.0.100", interface="eth0")}),
         "services.web.vip: expected an explicit prefix length")


def test_ipv6_vip_accepted_but_not_link_local_or_mapped():
    c = config.parse(doc(services={"web": svc(vip="2001:db8::10/64", interface="eth0")}))
    assert str(c.services["web"].vip) == "2001:db8::10/64" and c.vips == (("eth0", "2001:db8::10/64"),)
    assert "link-local" in fail(doc(services={"web": svc(vip="fe80::10/64", interface="eth0")}), "services.web.vip")
    assert "IPv4-mapped" in fail(doc(services={"web": svc(vip="::ffff:198.18.0.1/128", interface="eth0")}),
                                 "services.web.vip")


@pytest.mark.parametrize("interface", [None, "", "eth 0", "a/b", "x" * 16, 5])
def test_vip_without_valid_interface(interface):
    s = svc(vip="198.18.0.100/24")
    if interface is not None:
        s["interface"] = interface
    fail(doc(services={"web": s}), "services.web.interface: expected the network interface name")


def test_interface_without_vip_is_dropped():
    cfg = config.parse(doc(services={"web": svc(interface="eth0")}), SRC)
    assert cfg.services["web"].interface is None
    assert cfg.vips == ()


def test_duplicate_vip_across_services():
    msg = fail(doc(services={"a": svc(vip="198.18.0.100/24", interface="eth0"),
                             "b": svc(vip="198.18.0.100/16", interface="eth1")}), "services.b.vip")
    assert "'a'" in msg


def test_unknown_top_level_key():
    msg = fail(doc(lease_tll=3), "lease_tll: expected one of the known keys")
    assert "lease_ttl" in msg  # the known keys are listed, so the typo is obvious


def test_unknown_service_key():
    fail(doc(services={"web": svc(comand="x")}), "services.web.comand: expected one of the known keys")


def test_unknown_etcd_key():
    fail(doc(etcd={"endpoint": "http://x:2379"}), "etcd.endpoint: expected one of the known keys")


@pytest.mark.parametrize("field,value,expect", [
    ("priority", -1, "an integer between 0 and 1000000"),
    ("priority", "high", "an integer"),
    ("priority", True, "an integer"),
    ("priority", 1.5, "an integer"),
    ("stopwaitsecs", 0, "a whole number of seconds between 1 and 3600"),
    ("startretries", "x", "an integer"),
])
def test_bad_service_numbers(field, value, expect):
    fail(doc(services={"web": svc(**{field: value})}), f"services.web.{field}: expected {expect}")


def test_bad_environment():
    fail(doc(services={"web": svc(environment={"1BAD": "x"})}), "services.web.environment")
    fail(doc(services={"web": svc(environment=["A=1"])}), "services.web.environment")


def test_environment_value_with_newline_rejected():
    with pytest.raises(ConfigError):
        config.parse(doc(services={"web": svc(environment={"A": "x\nuser=root"})}), SRC)


def test_services_must_be_a_mapping():
    fail(doc(services=["web"]), "services: expected a mapping")
    fail(doc(services={"web": "/bin/true"}), "services.web: expected a mapping")


def test_top_level_must_be_a_mapping():
    fail(["node", "n1"], "(top level): expected a mapping")


# ---- errors: timing ------------------------------------------------------------------------

@pytest.mark.parametrize("ttl", [0, 1])
def test_lease_ttl_below_etcd_minimum(ttl):
    fail(doc(lease_ttl=ttl), f"lease_ttl: expected a whole number of seconds between 2 and 600 (got {ttl})")


def test_lease_ttl_must_be_integer():
    fail(doc(lease_ttl=2.5), "lease_ttl: expected a whole number of seconds")
    fail(doc(lease_ttl=2.0), "lease_ttl: expected a whole number of seconds")  # etcd takes whole seconds


def test_fence_margin_plus_keepalive_reaching_ttl():
    msg = fail(doc(lease_ttl=3, keepalive_interval=1, fence_margin=2), "fence_margin: expected less than")
    assert "lease_ttl - keepalive_interval = 2.00s" in msg


def test_fence_margin_plus_keepalive_just_below_ttl_then_timeout_rule():
    # 1.5 + 1 < 3 passes the margin rule; etcd.timeout 1.0 < 3 - 1.5 passes too
    cfg = config.parse(doc(lease_ttl=3, keepalive_interval=1, fence_margin=1.5), SRC)
    assert cfg.fence_margin == 1.5


def test_keepalive_interval_above_a_third_of_ttl():
    msg = fail(doc(lease_ttl=3, keepalive_interval=1.01), "keepalive_interval: expected at most lease_ttl/3")
    assert "1.00s" in msg
    config.parse(doc(lease_ttl=3, keepalive_interval=1.0), SRC)  # exactly a third is fine


def test_etcd_timeout_must_fit_before_fence():
    fail(doc(lease_ttl=2, fence_margin=1.0, etcd={"timeout": 1.0}), "etcd.timeout: expected less than")


def test_fence_margin_minimum():
    fail(doc(fence_margin=0.05), "fence_margin: expected a number of seconds between 0.1 and")


# ---- errors: etcd --------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint,expect", [
    ("notaurl:xx", "expected a port number"),
    ("ftp://10.0.0.5:2379", "expected a URL like http://HOST:2379"),
    ("http://:2379", "expected a URL like http://HOST:2379"),
    (2379, "expected a URL like http://HOST:2379"),
])
def test_bad_endpoint(endpoint, expect):
    msg = fail(doc(etcd={"endpoints": ["http://ok:2379", endpoint]}), "etcd.endpoints[1]: ")
    assert expect in msg


def test_empty_endpoints():
    fail(doc(etcd={"endpoints": []}), "etcd.endpoints: expected a non-empty list")


@pytest.mark.parametrize("prefix", ["etcdha", "/etcdha/", "/", "/a b"])
def test_bad_prefix(prefix):
    fail(doc(etcd={"prefix": prefix}), "etcd.prefix: expected a key prefix")


def test_parse_endpoint_results():
    assert config.parse_endpoint("http://10.0.0.5:2379") == ("10.0.0.5", 2379, False)
    assert config.parse_endpoint("https://etcd.example:2380") == ("etcd.example", 2380, True)
    assert config.parse_endpoint("10.0.0.5") == ("10.0.0.5", 2379, False)


# ---- load: files ---------------------------------------------------------------------------

def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nservices:\n  web:\n    command: [unclosed\n  db: x\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not valid YAML")
    assert re.search(r"at line \d+, column \d+", msg), msg


def test_invalid_yaml_tab_indentation_line(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nservices:\n\tweb: {}\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert "at line 3" in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = str(info.value)
    assert msg.startswith(str(path))
    assert "cannot read the config file" in msg and "No such file" in msg


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read the config file")


def test_path_below_a_file_is_unreadable(tmp_path):
    # readable by nobody, root included: a path that runs through a regular file
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "agent.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: cannot read the config file: ")
    assert "Not a directory" in msg


def test_binary_file_is_a_config_error(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(path) in str(info.value)


def test_errors_in_loaded_file_name_the_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nservices:\n  web:\n    priority: 3\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: services.web.command: expected a command to run")


@pytest.mark.parametrize("ttl, election, rides", [
    (2, 1.0, False),   # etcd's defaults: measured, every owner fenced itself at a leader change
    (3, 1.0, False),   # 1.4 s of renewals may fail; an election can take 2 s (3 of 3 ridden through, by luck)
    (2, 0.5, False),   # --election-timeout 500: measured, a survivor fenced in 4 of 10 leader-node crashes
    (2, 0.3, False),   # the default keepalive (ttl/4 = 0.5) leaves 0.9 s: too tight for two 0.3 s timeouts
    (6, 1.0, True),    # keepalive 1.5, margin 0.6: 3.9 s of renewals may fail
    (9, 4.0, False),
])
def test_election_ride_through(ttl, election, rides):
    """(The colocated profile, deploy/etcd-colocated.example, rides through with keepalive 0.25: see below.)"""
    c = config.parse({"node": "n1", "lease_ttl": ttl, "etcd": {"election_timeout": election},
                      "services": {"web": {"command": "/bin/true"}}}, SRC)
    assert c.etcd.election_timeout == election
    assert config.election_ride_through(c.lease_ttl, c.fence_margin, c.keepalive_interval,
                                        c.etcd.election_timeout) is rides


def test_the_colocated_profile_rides_through_an_election():
    c = config.parse({"node": "n1", "lease_ttl": 2, "keepalive_interval": 0.25, "etcd": {"election_timeout": 0.3},
                      "services": {"web": {"command": "/bin/true"}}}, SRC)
    assert config.election_ride_through(c.lease_ttl, c.fence_margin, c.keepalive_interval, c.etcd.election_timeout)
