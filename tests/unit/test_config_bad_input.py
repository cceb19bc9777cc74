"""Bad config input never weakens safety: every value is bounded, every string that reaches
argv, paths or the environment is free of control characters, and the YAML itself is bounded.
Each error is one line naming file, key path and expectation; every error is reported at once."""
from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from etcdha import config
from etcdha.errors import ConfigError

pytestmark = pytest.mark.unit

SRC = "/etc/etcdha/agent.yaml"
NAN, INF = float("nan"), float("inf")


def svc(**kw):
    return {"command": "/bin/true", **kw}


def doc(**kw):
    return {"node": "n1", "services": {"web": svc()}, **kw}


def web(**kw):
    return doc(services={"web": svc(**kw)})


def errors(data) -> list[str]:
    with pytest.raises(config.ConfigErrors) as info:
        config.parse(data, SRC)
    exc = info.value
    assert isinstance(exc, ConfigError)
    assert str(exc) == "\n".join(exc.errors)
    for line in exc.errors:
        assert line.startswith(SRC + ": ") and "\n" not in line, line
    return exc.errors


def only_error(data, expect: str) -> str:
    errs = errors(data)
    assert len(errs) == 1, errs
    assert expect in errs[0], errs[0]
    return errs[0]


def text_errors(text: str) -> list[str]:
    with pytest.raises(config.ConfigErrors) as info:
        config.loads(textwrap.dedent(text), SRC)
    for line in info.value.errors:
        assert line.startswith(SRC + ": ") and "\n" not in line, line
    return info.value.errors


# ---- numbers -------------------------------------------------------------------------------------

TOP_NUMBERS = {  # key: (expectation, a value below the minimum or None if 0 is allowed)
    "lease_ttl": ("a whole number of seconds between 2 and 600", 1),
    "keepalive_interval": ("a number of seconds between 0.05 and 200", 0),
    "fence_margin": ("a number of seconds between 0.1 and 600", 0),
    "reconcile_interval": ("a number of seconds between 0.1 and 3600", 0),
    "claim_delay": ("a number of seconds between 0 and 60", None),
    "startup_grace": ("a number of seconds between 0 and 3600", None),
    "failure_cooldown": ("a number of seconds between 0 and 604800", None),
    "move_timeout": ("a whole number of seconds between 2 and 3600", 1),
    "history_size": ("an integer between 1 and 10000", 0),
    "drain_concurrency": ("an integer between 1 and 1000", 0),
}
SERVICE_NUMBERS = {
    "priority": ("an integer between 0 and 1000000", None),
    "startsecs": ("a whole number of seconds between 0 and 3600", None),
    "startretries": ("an integer between 0 and 100", None),
    "stopwaitsecs": ("a whole number of seconds between 1 and 3600", 0),
}
BAD_NUMBERS = [NAN, INF, -INF, -1, -0.5, 10 ** 20, 1e300, True, False, "5", None, [1]]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize("key", sorted(TOP_NUMBERS))
def test_bad_top_level_number(key, value):
    only_error(doc(**{key: value}), f"{SRC}: {key}: expected {TOP_NUMBERS[key][0]} (got ")


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_bad_etcd_timeout(value):
    only_error(doc(etcd={"timeout": value}), "etcd.timeout: expected a number of seconds between 0.05 and 60 (got ")


@pytest.mark.parametrize("value", BAD_NUMBERS + [1.0], ids=repr)
@pytest.mark.parametrize("key", sorted(SERVICE_NUMBERS))
def test_bad_service_number(key, value):
    # 1.0 too: these are whole numbers, and a float there is a mistake worth pointing out
    only_error(web(**{key: value}), f"services.web.{key}: expected {SERVICE_NUMBERS[key][0]} (got ")


@pytest.mark.parametrize("key", [k for k, (_, low) in TOP_NUMBERS.items() if low is not None])
def test_top_level_number_below_minimum(key):
    only_error(doc(**{key: TOP_NUMBERS[key][1]}), f"{key}: expected {TOP_NUMBERS[key][0]}")


def test_zero_is_meaningful_where_allowed():
    cfg = config.parse(doc(claim_delay=0, startup_grace=0, failure_cooldown=0,
                           services={"web": svc(priority=0, startsecs=0, startretries=0)}), SRC)
    assert (cfg.claim_delay, cfg.startup_grace, cfg.failure_cooldown) == (0.0, 0.0, 0.0)
    assert (cfg.services["web"].priority, cfg.services["web"].startsecs) == (0, 0)


def test_maximums_are_accepted():
    cfg = config.parse(doc(lease_ttl=600, keepalive_interval=200, fence_margin=1, reconcile_interval=3600,
                           claim_delay=60, startup_grace=3600, failure_cooldown=604800, move_timeout=3600,
                           history_size=10000, drain_concurrency=1000, etcd={"timeout": 60},
                           services={"web": svc(priority=1_000_000, startsecs=3600, startretries=100,
                                                stopwaitsecs=3600)}), SRC)
    assert cfg.lease_ttl == 600 and cfg.failure_cooldown == 604800.0


@pytest.mark.parametrize("text,key", [
    ("fence_margin: .nan", "fence_margin"),
    ("fence_margin: .NaN", "fence_margin"),
    ("keepalive_interval: .inf", "keepalive_interval"),
    ("claim_delay: -.inf", "claim_delay"),
    ("lease_ttl: 100000000000000000000", "lease_ttl"),
    ("history_size: 0x7fffffffffffffffffff", "history_size"),
])
def test_yaml_special_numbers_rejected(text, key):
    errs = text_errors(f"node: n1\n{text}\nservices: {{web: {{command: /bin/true}}}}\n")
    assert len(errs) == 1 and errs[0].startswith(f"{SRC}: {key}: expected"), errs


def test_nan_fence_margin_message():
    assert only_error(doc(fence_margin=NAN), "fence_margin").endswith(
        "fence_margin: expected a number of seconds between 0.1 and 600 (got nan)")


def test_huge_integers_are_shown_briefly():
    line = only_error(doc(lease_ttl=1 << 5000), "lease_ttl: expected")
    assert "an integer of 5001 bits" in line and len(line) < 200


def test_integer_too_long_for_python_is_a_clean_error():
    errs = text_errors("node: n1\nlease_ttl: " + "9" * 5000 + "\n")
    assert len(errs) == 1 and "a value cannot be read" in errs[0]


def test_relations_still_checked():
    # each value is within its own bounds; together they would let the fence fire between renewals
    only_error(doc(lease_ttl=3, keepalive_interval=1, fence_margin=2.5, etcd={"timeout": 0.1}),
               "fence_margin: expected less than lease_ttl - keepalive_interval = 2.00s")


# ---- strings: control characters -----------------------------------------------------------------

CONTROL = ["\n", "\r", "\0", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]


def _ids(c: str) -> str:
    return repr(c)


@pytest.mark.parametrize("c", CONTROL, ids=_ids)
def test_control_characters_in_command_list(c):
    line = only_error(web(command=["/bin/echo", f"a{c}b"]), "services.web.command: expected a command with no "
                                                             "control characters")
    assert repr(c)[1:-1] in line  # shown escaped, never raw


@pytest.mark.parametrize("c", ["\n", "\0", "\u2028", "\x1b"], ids=_ids)
def test_control_characters_in_command_string(c):
    # shlex keeps quoted newlines (and never treats NUL or U+2028 as whitespace)
    only_error(web(command=f"/bin/echo 'a{c}b'"), "services.web.command: expected a command with no control")


@pytest.mark.parametrize("c", CONTROL, ids=_ids)
def test_control_characters_in_environment_value(c):
    only_error(web(environment={"A": f"x{c}user=root"}),
               "services.web.environment.A: expected a value with no control characters")


@pytest.mark.parametrize("key", ["A\nB", "A\0", "A B", "1A", "", "A=B", "A\u2028"], ids=_ids)
def test_bad_environment_names(key):
    line = only_error(web(environment={key: "x"}), "expected a variable name of letters, digits and '_'")
    assert line.startswith(f"{SRC}: services.web.environment.")


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, NAN, INF, b"x"], ids=repr)
def test_environment_values_must_be_scalars(value):
    only_error(web(environment={"A": value}), "services.web.environment.A: expected a string value")


def path_doc(where: str, value: str) -> tuple[dict, str]:
    """A config with `value` at the path key `where`, and that key's path in error messages."""
    if where == "directory":
        return web(directory=value), "services.web.directory"
    if where in ("ca_cert", "cert", "key"):
        return doc(etcd={where: value}), f"etcd.{where}"
    return doc(**{where: value}), where


@pytest.mark.parametrize("c", CONTROL, ids=_ids)
@pytest.mark.parametrize("where", ["directory", "run_dir", "ca_cert", "cert", "key", "cgroup_root"])
def test_control_characters_in_paths(where, c):
    data, path = path_doc(where, f"/srv/a{c}b")
    only_error(data, f"{path}: expected a")
    assert "control characters" in errors(data)[0]


@pytest.mark.parametrize("c", CONTROL, ids=_ids)
def test_control_characters_in_interface(c):
    only_error(web(vip="198.18.0.100/24", interface=f"eth{c}"),
               "services.web.interface: expected the network interface name")


@pytest.mark.parametrize("c", CONTROL + [" "], ids=_ids)
def test_control_characters_in_endpoint(c):
    # urlparse would silently drop a tab or newline: the check must come before it
    only_error(doc(etcd={"endpoints": [f"http://10.0.0.5:23{c}79"]}),
               "etcd.endpoints[0]: expected a URL like http://HOST:2379 without whitespace or control characters")


@pytest.mark.parametrize("endpoint", ["http://10.0.0.5:0", "http://10.0.0.5:", "http://10.0.0.5:70000"])
def test_endpoint_port_out_of_range(endpoint):
    only_error(doc(etcd={"endpoints": [endpoint]}), "etcd.endpoints[0]: expected a port number from 1 to 65535")


@pytest.mark.parametrize("c", CONTROL, ids=_ids)
def test_control_characters_in_prefix_and_node(c):
    only_error(doc(etcd={"prefix": f"/etcdha{c}x"}), "etcd.prefix: expected a key prefix")
    only_error(doc(node=f"n1{c}"), "node: expected a name of")


def test_key_with_control_characters_stays_one_line():
    errs = errors(doc(**{"bad\nkey": 1, "services": {"w\neb": svc(), "db": svc(**{"x\u2028": 1})}}))
    assert any(line.startswith(f"{SRC}: 'bad\\nkey': expected one of the known keys") for line in errs), errs
    assert any(line.startswith(f"{SRC}: services.'w\\neb': expected a name") for line in errs), errs
    assert any(line.startswith(f"{SRC}: services.db.'x\\u2028': expected one of the known keys") for line in errs)


@pytest.mark.parametrize("interface", ["eth0:1", ".", "..", "é" * 8])
def test_interface_names_the_kernel_refuses(interface):
    only_error(web(vip="198.18.0.100/24", interface=interface), "services.web.interface: expected")


def test_interface_without_vip_is_still_checked():
    only_error(web(interface="eth\n0"), "services.web.interface: expected the network interface name")


@pytest.mark.parametrize("vip", ["0.0.0.0/0", "224.0.0.5/24", "255.255.255.255/32"])
def test_vip_must_be_unicast(vip):
    only_error(web(vip=vip, interface="eth0"), "services.web.vip: expected a unicast address")


@pytest.mark.parametrize("vip", [3232235777, ["198.18.0.1/24"], True])
def test_vip_must_be_a_string(vip):
    only_error(web(vip=vip, interface="eth0"), "services.web.vip: expected an address with prefix length")


def test_empty_program_name_rejected():
    only_error(web(command=["", "x"]), "services.web.command: expected a non-empty command")
    only_error(web(command="'' x"), "services.web.command: expected a non-empty command")


# ---- strings: values now allowed verbatim --------------------------------------------------------

@pytest.mark.parametrize("value", ['"quoted"', "'single'", "both ' and \"", "a ; b", "a # b", "100%", "%(ENV_X)s",
                                   "ünïcödé", " padded "])
def test_environment_values_kept_verbatim(value):
    cfg = config.parse(web(environment={"A": value}), SRC)
    assert cfg.services["web"].environment == {"A": value}


def test_command_with_percent_and_semicolon_kept_verbatim():
    cfg = config.parse(web(command="/bin/echo 100% 'a ; b' '#x'"), SRC)
    assert cfg.services["web"].command == ("/bin/echo", "100%", "a ; b", "#x")


def test_directory_may_contain_spaces():
    assert config.parse(web(directory="/srv/my app"), SRC).services["web"].directory == "/srv/my app"


# ---- paths ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["srv/app", "./app", "~/app", "", "app"])
@pytest.mark.parametrize("where", ["directory", "run_dir", "ca_cert", "cert", "key", "cgroup_root"])
def test_relative_paths_rejected(where, value):
    data, path = path_doc(where, value)
    only_error(data, f"{path}: expected an absolute path (starting with /) (got {value!r})")


@pytest.mark.parametrize("where", ["directory", "run_dir", "ca_cert", "cgroup_root"])
def test_paths_must_be_strings(where):
    if where == "directory":
        data, path = web(directory=5), "services.web.directory"
    elif where == "ca_cert":
        data, path = doc(etcd={"ca_cert": 5}), "etcd.ca_cert"
    else:
        data, path = doc(**{where: 5}), where
    only_error(data, f"{path}: expected a")


def test_run_dir_length_limit():
    ok = "/" + "r" * 79
    assert config.parse(doc(run_dir=ok), SRC).run_dir == Path(ok)
    line = only_error(doc(run_dir=ok + "r"), "run_dir: expected a path of at most 80 bytes")
    assert "at most 80 bytes, not 81" in line and "supervisor.sock" in line
    only_error(doc(run_dir="/" + "é" * 40), "run_dir: expected a path of at most 80 bytes")  # 81 bytes, 41 chars


@pytest.mark.parametrize("value", ["/run/etc dha", "/run/etcdha\u00a0x", "/run/a;b", "/run/a#b", "/run/100%"])
def test_run_dir_without_comment_characters(value):
    line = only_error(doc(run_dir=value), "run_dir: expected a path without whitespace, ';', '#' or '%'")
    assert "comment" in line


def test_cgroup_root():
    assert config.parse(doc(), SRC).cgroup_root is None
    cfg = config.parse(doc(cgroup_root="/sys/fs/cgroup/etcdha"), SRC)
    assert cfg.cgroup_root == Path("/sys/fs/cgroup/etcdha")
    only_error(doc(cgroup_root="/sys/fs/cgroup/my slice"), "cgroup_root: expected a cgroup directory path without "
                                                          "whitespace")


# ---- several errors at once ----------------------------------------------------------------------

def test_every_error_is_reported():
    errs = errors({"node": "n1", "lease_ttl": 1, "run_dir": "relative",
                   "services": {"web": svc(priority=-5), "db": {"command": "x 'y"}}})
    assert [e.split(": ")[1] for e in errs] == ["lease_ttl", "services.web.priority", "services.db.command",
                                                "run_dir"]


def test_three_bad_keys_three_lines():
    errs = errors(doc(fence_margin=NAN, claim_delay=-1, etcd={"ca_cert": "ca.pem"}))
    assert len(errs) == 3
    assert {e.split(": ")[1] for e in errs} == {"fence_margin", "claim_delay", "etcd.ca_cert"}


def test_several_unknown_keys_each_reported():
    errs = errors(doc(lease_tll=3, fence_marign=1))
    assert [e.split(": ")[1] for e in errs] == ["fence_marign", "lease_tll"]


def test_load_reports_every_error(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nfence_margin: .nan\nrun_dir: \"/run/x\\ny\"\nservices:\n  web:\n    priority: 3\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    lines = str(info.value).split("\n")
    assert lines == info.value.errors
    assert [ln.split(": ")[1] for ln in lines] == ["fence_margin", "services.web.command", "run_dir"]
    assert all(ln.startswith(f"{path}: ") for ln in lines)


# ---- YAML ----------------------------------------------------------------------------------------

def test_duplicate_top_level_key():
    errs = text_errors("""\
        node: n1
        lease_ttl: 2
        services: {web: {command: /bin/true}}
        lease_ttl: 30
        """)
    assert errs == [f"{SRC}: line 4: duplicate key lease_ttl (first at line 2; YAML would silently keep only the "
                    "last)"]


def test_duplicate_nested_keys_all_reported_with_other_errors():
    errs = text_errors("""\
        node: n1
        fence_margin: .nan
        services:
          web:
            command: /bin/true
            priority: 1
            command: /bin/false
          db:
            environment: {A: 1, A: 2}
            command: /bin/true
        """)
    assert errs[0].startswith(f"{SRC}: line 7: duplicate key services.web.command (first at line 5")
    assert errs[1].startswith(f"{SRC}: line 9: duplicate key services.db.environment.A (first at line 9")
    assert errs[2].startswith(f"{SRC}: fence_margin: expected")
    assert len(errs) == 3


def test_keys_equal_after_decoding_are_duplicates():
    errs = text_errors("node: n1\nservices: {web: {command: /bin/true, environment: {A: x}}}\n'node': n2\n")
    assert errs[0].startswith(f"{SRC}: line 3: duplicate key node")


def test_merge_keys_still_work():
    text = textwrap.dedent("""\
        node: n1
        services:
          web: &web
            <<: {startsecs: 5, stopwaitsecs: 9}
            command: /bin/true
            stopwaitsecs: 3
          db:
            <<: *web
            command: /bin/false
        """)
    cfg = config.loads(text, SRC)
    assert (cfg.services["web"].startsecs, cfg.services["web"].stopwaitsecs) == (5, 3)
    assert (cfg.services["db"].startsecs, cfg.services["db"].stopwaitsecs) == (5, 3)
    assert cfg.services["db"].command == ("/bin/false",)


def test_merge_keys_from_a_mapping_defined_earlier_do_not_look_duplicated():
    # a merged mapping that itself overrides a merged key: PyYAML flattens it in place while
    # constructing; duplicate detection must see the document, not the flattened nodes
    text = textwrap.dedent("""\
        node: n1
        services:
          a: &a
            <<: {command: /bin/a, priority: 1}
            priority: 2
          b:
            <<: *a
            command: /bin/b
        """)
    cfg = config.loads(text, SRC)
    assert cfg.services["a"].priority == 2 and cfg.services["b"].priority == 2
    assert cfg.services["b"].command == ("/bin/b",)


def test_billion_laughs_fails_fast():
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    text = "\n".join(lines) + "\nnode: n1\nservices: {web: {command: /bin/true}}\n"
    started = time.monotonic()
    errs = text_errors(text)
    took = time.monotonic() - started
    assert errs == [f"{SRC}: too many nodes after expanding aliases (more than 100000; a config needs a few "
                    "hundred)"]
    assert took < 2.0, f"took {took:.2f}s"


def test_deep_nesting_fails_cleanly():
    for text in ("[" * 1000 + "]" * 1000, "services: " + "[" * 100000):
        errs = text_errors(text)
        assert len(errs) == 1 and "nested deeper than 32 levels" in errs[0], errs


def test_deep_block_nesting_fails_cleanly():
    text = "".join(f"{'  ' * i}k{i}:\n" for i in range(500)) + "  " * 500 + "x\n"
    errs = text_errors(text)
    assert len(errs) == 1 and "nested deeper than 32 levels" in errs[0], errs


def test_depth_through_aliases_is_bounded():
    inner = "[" * 20 + "x" + "]" * 20
    text = f"a: &a {inner}\nb: " + "[" * 20 + "*a" + "]" * 20 + "\n"
    errs = text_errors(text)
    assert len(errs) == 1 and "nested deeper than 32 levels after expanding aliases" in errs[0], errs


def test_recursive_alias_rejected():
    errs = text_errors("a: &a [1, *a]\nnode: n1\n")
    assert len(errs) == 1 and "an alias refers to a collection that contains it" in errs[0], errs


def test_too_many_plain_nodes():
    errs = text_errors("x: [" + "1," * 150000 + "1]\n")
    assert len(errs) == 1 and "more than 100000 YAML nodes" in errs[0], errs


def test_file_over_one_mib(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node: n1\nservices: {web: {command: /bin/true}}\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(config.ConfigErrors) as info:
        config.load(path)
    assert info.value.errors == [f"{path}: larger than 1 MiB; a config is a few kilobytes"]


def test_file_just_under_one_mib_is_read(tmp_path):
    head = "node: n1\nservices: {web: {command: /bin/true}}\n"
    path = tmp_path / "agent.yaml"
    path.write_text(head + "#" * ((1 << 20) - len(head) - 1) + "\n")
    assert config.load(path).node == "n1"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# another\n", "null\n", "~\n", "---\n"])
def test_empty_file_is_an_error(tmp_path, text):
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigErrors) as info:
        config.load(path)
    assert info.value.errors == [f"{path}: (top level): expected a mapping with at least a services: section (got "
                                 "'an empty document')"]


def test_services_without_entries_is_an_error():
    assert text_errors("node: n1\nservices:\n") == [
        f"{SRC}: services: expected at least one service, like services: {{web: {{command: ...}}}} (an agent "
        "without services does nothing)"]


def test_two_documents_rejected():
    errs = text_errors("node: n1\n---\nnode: n2\n")
    assert len(errs) == 1 and "expected a single document in the stream, but found another document" in errs[0]


def test_raw_control_character_in_file_is_one_line():
    errs = text_errors("node: n1\x07\n")
    assert errs == [f"{SRC}: not valid YAML at character 9: unacceptable character #x0007"]


@pytest.mark.parametrize("text", ["a: !!python/object/apply:os.system [true]\n", "a: !!float abc\n", "a: !!binary 'é'\n",
                                  "a: 2020-13-45\n", "? [a]\n: 1\n"])
def test_undecodable_values_are_clean_errors(text):
    errs = text_errors(text)
    assert len(errs) == 1 and "\n" not in errs[0]


def test_libyaml_reads_valid_configs_and_they_mean_the_same(monkeypatch):
    """Valid documents go through libyaml's parser (a 500-service config: ~25 ms, not ~300 ms of an
    agent's start); what they decode to must not change, merge keys and duplicates included."""
    assert config._CParser is not None, "PyYAML without libyaml: configs are read at pure-Python speed"
    services = "\n".join(f"  s{i}:\n    <<: *base\n    command: [sleep, '{i}']\n    vip: 198.18.1.{i % 250 + 1}/24"
                         for i in range(200))
    texts = [
        "node: n1\nbase: &base {startsecs: 0, stopwaitsecs: 3, environment: {A: 'x: y', B: \"\\t\"}}\nservices:\n"
        + services + "\n",
        "node: n1\nservices:\n  web:\n    command: /bin/true\n    command: /bin/false\n",  # a duplicate key
        "node: n1\n",
    ]
    pure = []
    with monkeypatch.context() as m:
        m.setattr(config, "_CParser", None)
        for text in texts:
            pure.append(config._decode(text, SRC))

    def refuse(*_args):
        raise AssertionError("the pure-Python loader read a valid document")

    monkeypatch.setattr(config, "_Loader", refuse)
    assert [config._decode(text, SRC) for text in texts] == pure
    assert pure[1][1] and "duplicate key services.web.command" in pure[1][1][0]
