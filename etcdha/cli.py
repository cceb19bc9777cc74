"""`etcdha` command line: thin commands over config, store and report.

Settings come from options or ETCDHA_* environment variables. User errors are
ClickExceptions (exit 1, one clear line, no traceback).
"""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import click

from etcdha import __version__, config as config_mod, decide, logs, model, report
from etcdha.errors import ConfigError, EtcdhaError, StoreError
from etcdha.store import Store


@dataclasses.dataclass
class Settings:
    config_path: Optional[str]
    endpoints: Optional[str]
    prefix: Optional[str]
    timeout: float
    user: Optional[str] = None
    password_file: Optional[str] = None

    def etcd(self) -> config_mod.EtcdConfig:
        """etcd settings: explicit options win over the agent config file, which wins over defaults."""
        base = config_mod.EtcdConfig()
        if self.config_path:
            base = load_config(self.config_path).etcd
        if self.endpoints:
            eps = tuple(e.strip() for e in self.endpoints.split(",") if e.strip())
            for e in eps:
                try:
                    config_mod.parse_endpoint(e, "--endpoints")
                except ConfigError as exc:
                    raise click.BadParameter(str(exc), param_hint="--endpoints") from None
            base = dataclasses.replace(base, endpoints=eps)
        if self.prefix:
            try:
                base = dataclasses.replace(base, prefix=config_mod.check_prefix(self.prefix, "--prefix"))
            except ConfigError as exc:
                raise click.BadParameter(str(exc), param_hint="--prefix") from None
        if self.user is not None:
            base = dataclasses.replace(base, username=self.user, password_file=self.password_file)
        elif self.password_file is not None:
            raise click.BadParameter("a password without --user is never used", param_hint="--password-file")
        return dataclasses.replace(base, timeout=self.timeout)


def load_config(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def open_store(settings: Settings) -> Store:
    try:
        return Store(settings.etcd())
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ETCDHA"})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="ETCDHA_CONFIG",
              help="Agent config file; its etcd endpoints and prefix are used.")
@click.option("--endpoints", envvar="ETCDHA_ENDPOINTS", help="Comma-separated etcd URLs (default from --config, "
              "else http://127.0.0.1:2379).")
@click.option("--prefix", envvar="ETCDHA_PREFIX", help="Key prefix (default /etcdha).")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=3.0, show_default=True, envvar="ETCDHA_TIMEOUT",
              help="Seconds to wait for etcd before giving up.")
@click.option("--user", envvar="ETCDHA_USER", help="etcd user (auth/RBAC; default from --config). The password: "
              f"--password-file, else ${config_mod.PASSWORD_ENV} (never on the command line).")
@click.option("--password-file", type=click.Path(dir_okay=False), envvar="ETCDHA_PASSWORD_FILE",
              help="File whose first line is the etcd password of --user.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("--log-format", type=click.Choice(logs.FORMATS), default="auto", show_default=True,
              envvar="ETCDHA_LOG_FORMAT", help="Log lines: text; journal (a <N> priority prefix per line for "
              "journald); json (one object per line); auto = journal when stderr is the journal, else text.")
@click.version_option(__version__, prog_name="etcdha")
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str], endpoints: Optional[str], prefix: Optional[str],
         timeout: float, user: Optional[str], password_file: Optional[str], verbose: int, log_format: str) -> None:
    """etcdha: run each service, with its virtual IP, on exactly one healthy node.

    \b
    Examples:
      etcdha agent --config /etc/etcdha/agent.yaml
      etcdha --endpoints http://10.0.0.5:2379 status
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logs.setup(log_format, level)
    ctx.obj = Settings(config_path, endpoints, prefix, timeout, user, password_file)


@main.command()
@click.option("--config", "agent_config", type=click.Path(dir_okay=False), help="Agent config file.")
@click.pass_obj
def agent(settings: Settings, agent_config: Optional[str]) -> None:
    """Run the agent on this node (normally as a systemd service).

    \b
    Example:
      etcdha agent --config /etc/etcdha/agent.yaml
    """
    from etcdha.agent import Agent  # imported here: other commands need not load it

    path = agent_config or settings.config_path
    if not path:
        raise click.UsageError("the agent needs a config file: etcdha agent --config PATH")
    cfg = load_config(path)
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    try:
        code = Agent(cfg).run()
    except EtcdhaError as exc:  # e.g. supervisord cannot start, unreadable TLS files
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command("stop-post")
@click.option("--config", "agent_config", type=click.Path(dir_okay=False), help="Agent config file.")
@click.pass_obj
def stop_post(settings: Settings, agent_config: Optional[str]) -> None:
    """After the agent's unit stopped (systemd ExecStopPost=): hand its lease over if the node is clean.

    Kills anything left in the node's service cgroups, removes its VIPs and, once both
    are verified, revokes the agent's last lease so another node takes over at once
    instead of after the lease's TTL. Does nothing after a graceful stop.

    \b
    Example (deploy/etcdha.service):
      ExecStopPost=/opt/etcdha/venv/bin/etcdha stop-post --config /etc/etcdha/agent.yaml
    """
    from etcdha import fence
    from etcdha.fence import stop_post as run_stop_post

    fence.LOG_FORMAT = logs.chosen()

    path = agent_config or settings.config_path
    if not path:
        raise click.UsageError("stop-post needs the agent's config file: etcdha stop-post --config PATH")
    sys.exit(run_stop_post(load_config(path).run_dir / "handoff.json"))


@main.command("check-config")
@click.argument("file", required=False, type=click.Path())
@click.option("--no-host-checks", is_flag=True,
              help="Only the file itself: skip checking interfaces, programs, directories and TLS files on this host.")
@click.pass_obj
@click.pass_context
def check_config(ctx: click.Context, settings: Settings, file: Optional[str], no_host_checks: bool) -> None:
    """Check an agent config FILE (default: --config) without etcd, like `keepalived --config-test`.

    Prints every problem at once, one line each, on stderr and exits 1; else
    prints FILE: OK. Unless --no-host-checks, also checks that this host has the
    VIP interfaces, programs, directories and TLS files the config names.

    \b
    Examples:
      etcdha check-config /etc/etcdha/agent.yaml
      etcdha check-config --no-host-checks node2.yaml   # written for another host
    """
    path = file or settings.config_path
    if not path:
        raise click.UsageError("which file? etcdha check-config PATH")
    try:
        cfg = config_mod.load(path)
        problems = [] if no_host_checks else config_mod.host_problems(cfg)
    except ConfigError as exc:
        problems = list(getattr(exc, "errors", None) or [str(exc)])
    if problems:
        for line in problems:
            click.echo(line, err=True)
        ctx.exit(1)
    names = sorted(cfg.services)
    click.echo(f"{path}: OK ({len(names)} service{'s' if len(names) != 1 else ''}: {', '.join(names)})")


def fail_store(exc: StoreError) -> click.ClickException:
    return click.ClickException(str(exc))


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[Store]:
    """A Store for one command; etcd errors become one clear line (exit 1)."""
    store = open_store(settings)
    try:
        yield store
    except StoreError as exc:
        raise fail_store(exc) from None
    finally:
        store.close()


def status_doc(store: Store) -> dict:
    view = store.snapshot()
    ttl = {}
    for info in view.nodes.values():
        try:
            ttl[info.lease] = store.lease_ttl_left(info.lease)
        except StoreError:
            pass
    return report.status(view, ttl)


WAIT_STALE = 1.0  # s without any answer on the watch after which --wait reads the cluster from etcd
WAIT_COALESCE = 0.02  # s of changes gathered before --wait looks again


def wait_for(store: Store, done: Callable[[model.ClusterView], Optional[str]], timeout: float,
             progress: Callable[[model.ClusterView], Optional[str]] = lambda v: None) -> Optional[model.ClusterView]:
    """Follow the cluster until `done(view)` is truthy or timeout: the view is kept from the watch (list
    once, then apply events), looked at on every change (gathered for WAIT_COALESCE s) and every 0.5 s.

    A drain of hundreds of services changes etcd hundreds of times a second; re-reading the
    whole cluster on each change cost etcd and this process O(services) per change. Whenever
    the stream has not answered for WAIT_STALE s, the cluster is read from etcd instead.
    """
    wake = threading.Event()
    informer = store.informer(wake.set)
    informer.start()
    deadline = time.monotonic() + timeout
    last = None
    try:
        while True:
            view = informer.view(WAIT_STALE) or store.snapshot()
            note = progress(view)
            if note and note != last:
                click.echo(note)
                last = note
            if done(view):
                return view
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if wake.wait(min(0.5, left)):
                time.sleep(min(WAIT_COALESCE, max(0.0, deadline - time.monotonic())))
            wake.clear()
    finally:
        informer.stop()


def known_service(view: model.ClusterView, service: str) -> None:
    if service not in view.services and service not in view.owners:
        known = ", ".join(sorted(view.services)) or "none"
        raise click.BadParameter(f"unknown service {service!r} (known: {known})", param_hint="SERVICE")


def known_node(view: model.ClusterView, node: str) -> None:
    if node not in view.members:
        known = ", ".join(sorted(view.members)) or "none"
        raise click.BadParameter(f"unknown node {node!r} (known: {known})", param_hint="NODE")


def _complete(kind: str) -> Callable:
    """Shell completion of service or node names, read from etcd (silent and quick on any error)."""
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        root = ctx.find_root().params
        try:
            settings = Settings(root.get("config_path"), root.get("endpoints"), root.get("prefix"), 1.0)
            store = Store(settings.etcd())
            try:
                view = store.snapshot()
            finally:
                store.close()
        except Exception:  # noqa: BLE001 - completion must never print a traceback into the shell
            return []
        names = view.services if kind == "service" else view.members
        return sorted(n for n in names if n.startswith(incomplete))
    return complete


complete_service, complete_node = _complete("service"), _complete("node")


def who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a stable interface).")
@click.option("--watch", is_flag=True, help="Redraw whenever something changes in etcd (Ctrl-C to stop).")
@click.pass_obj
def status(settings: Settings, as_json: bool, watch: bool) -> None:
    """Show every service's owner and state, and every node's liveness.

    \b
    Examples:
      etcdha --config /etc/etcdha/agent.yaml status
      etcdha status --json | jq '.services.web.owner'
      etcdha status --watch
    """
    render = (lambda d: json.dumps(d, indent=2, sort_keys=True)) if as_json else report.table
    with connected(settings) as store:
        if not watch:
            click.echo(render(status_doc(store)))
            return
        wake = threading.Event()
        watcher = store.watcher(wake.set)
        watcher.start()
        # Ctrl-C ends the loop between two redraws: a KeyboardInterrupt raised inside a gRPC call could
        # leave the client unable to close (seen once: `status --watch` ignoring SIGINT). The handler
        # only sets a flag (no lock: it runs between two bytecodes of this thread) and gives SIGINT back,
        # so a second Ctrl-C interrupts whatever is slow (an unreachable etcd) at once.
        stop: list[bool] = []

        def interrupted(*_: object) -> None:
            stop.append(True)
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = signal.signal(signal.SIGINT, interrupted)
        try:
            while not stop:
                text = render(status_doc(store))
                click.clear()
                click.echo(f"{time.strftime('%H:%M:%S')}  (watching {store.endpoint}{store.prefix}; Ctrl-C to stop)")
                click.echo(text)
                for _ in range(50):  # 5 s, or until a change (or Ctrl-C)
                    if stop or wake.wait(0.1):
                        break
                wake.clear()
                if not stop:
                    time.sleep(0.1)  # let a burst of changes settle into one redraw
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGINT, previous)
            watcher.stop()


@main.command()
@click.argument("service", shell_complete=complete_service)
@click.option("--to", "target", metavar="NODE", shell_complete=complete_node,
              help="Target node (default: the best other live candidate).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the target owns it.")
@click.option("--timeout", "move_timeout", type=click.IntRange(2, 3600), default=10, show_default=True,
              help="Seconds for the target to take over; after that normal election resumes.")
@click.pass_obj
def move(settings: Settings, service: str, target: Optional[str], wait: bool, move_timeout: int) -> None:
    """Hand SERVICE over to another node (a planned move; nothing is left behind).

    The owner stops the service and releases it; only the target may claim it
    until the move completes or --timeout passes. Exit code 0 means the target owns it.

    \b
    Examples:
      etcdha move web --to n2
      etcdha move web            # to the best other live candidate
    """
    with connected(settings) as store:
        view = store.snapshot()
        known_service(view, service)
        target, refusal = decide.move_target(view, service, target, time.time())
        if refusal:
            raise click.ClickException(refusal)
        owner = view.owners[service]
        if not store.request_move(service, owner.node, target, owner.token, move_timeout):
            raise click.ClickException(f"the owner of {service} changed meanwhile; look again with etcdha status")
        click.echo(f"moving {service} from {owner.node} to {target}")
        if not wait:
            return
        started = time.monotonic()
        final = wait_for(store, lambda v: (v.owners.get(service) is not None
                                           and v.owners[service].node == target), move_timeout + 1)
        if final is None:
            now_owner = store.snapshot().owners.get(service)
            raise click.ClickException(f"{target} did not take {service} within {move_timeout}s; normal election "
                                       f"resumes (owner now: {now_owner.node if now_owner else 'none'})")
        click.echo(f"{service} now runs on {target} (took {time.monotonic() - started:.2f}s, "
                   f"fencing token {final.owners[service].token})")


@main.command()
@click.argument("node", shell_complete=complete_node)
@click.option("--wait", is_flag=True, help="Show progress and return when NODE owns nothing.")
@click.option("--timeout", "drain_timeout", type=click.FloatRange(1, 86400), default=300, show_default=True,
              help="With --wait: give up after this many seconds (the node stays drained).")
@click.pass_obj
def drain(settings: Settings, node: str, wait: bool, drain_timeout: float) -> None:
    """Move every service off NODE, one by one, and keep it from taking new ones.

    The mark persists (also across agent restarts) until `etcdha undrain NODE`.
    A service that no other live node can run stays where it is.

    \b
    Examples:
      etcdha drain n1 --wait
      etcdha undrain n1
    """
    with connected(settings) as store:
        view = store.snapshot()
        known_node(view, node)
        store.put(model.drain_key(store.prefix, node), model.encode_mark(time.time(), who()))
        click.echo(f"{node} is drained")
        if not wait:
            return

        def owned(v: model.ClusterView) -> list[str]:
            return sorted(s for s, o in v.owners.items() if o.node == node)

        def progress(v: model.ClusterView) -> str:
            left = owned(v)
            moving = ", ".join(f"{m.service} -> {m.to}" for m in v.moves.values() if m.source == node)
            stuck = [s for s in left if not [c for c in v.eligible(s) if c.node != node]]
            return (f"  {node} still owns: {', '.join(left) or 'nothing'}"
                    + (f"; moving: {moving}" if moving else "")
                    + (f"; no other node can run: {', '.join(stuck)}" if stuck else ""))

        def done(v: model.ClusterView) -> bool:  # nothing owned, and the last move landed (or expired)
            return not owned(v) and not any(m.source == node for m in v.moves.values())

        final = wait_for(store, done, drain_timeout, progress)
        if final is None:
            raise click.ClickException(f"{node} still owns {', '.join(owned(store.snapshot()))} after "
                                       f"{drain_timeout:g}s (it stays drained)")
        click.echo(f"{node} owns nothing now")


@main.command()
@click.argument("node", shell_complete=complete_node)
@click.pass_obj
def undrain(settings: Settings, node: str) -> None:
    """Let NODE take services again (services do not move back by themselves).

    \b
    Example:
      etcdha undrain n1
    """
    with connected(settings) as store:
        existed = store.delete(model.drain_key(store.prefix, node))
        click.echo(f"{node} is no longer drained" if existed else f"{node} was not drained")


@main.command()
@click.argument("service", required=False, shell_complete=complete_service)
@click.pass_obj
def pause(settings: Settings, service: Optional[str]) -> None:
    """Maintenance: agents neither start, stop nor move SERVICE (or every service).

    Agents keep their leases and keep reporting state; the fence still stops a
    paused service on a node that loses its lease (safety first), and nobody else
    claims a paused service meanwhile.

    \b
    Examples:
      etcdha pause web           # then work on web by hand
      etcdha pause               # every service
    """
    with connected(settings) as store:
        if service is not None:
            known_service(store.snapshot(), service)
        store.put(model.pause_key(store.prefix, service or model.ALL_SERVICES), model.encode_mark(time.time(), who()))
        click.echo(f"paused {service or 'every service'}")


@main.command()
@click.argument("service", required=False, shell_complete=complete_service)
@click.pass_obj
def resume(settings: Settings, service: Optional[str]) -> None:
    """End maintenance for SERVICE, or (without SERVICE) every pause mark.

    \b
    Examples:
      etcdha resume web
      etcdha resume
    """
    with connected(settings) as store:
        paused = store.snapshot().paused
        if service and service not in paused and model.ALL_SERVICES in paused:
            raise click.ClickException(f"{service} is paused because every service is; "
                                       "`etcdha resume` (without SERVICE) lifts that")
        names = [service] if service else sorted(paused)
        gone = [n for n in names if store.delete(model.pause_key(store.prefix, n))]
        click.echo(f"resumed {', '.join('every service' if n == model.ALL_SERVICES else n for n in gone)}"
                   if gone else "nothing was paused")


@main.command()
@click.option("--raw", is_flag=True, help="Exactly what `etcdctl get --prefix PREFIX/` prints.")
@click.pass_obj
def keys(settings: Settings, raw: bool) -> None:
    """Show every key under the prefix, decoded, with its lease and the TTL left.

    \b
    Examples:
      etcdha keys
      etcdha keys --raw | diff - <(etcdctl get --prefix /etcdha/)
    """
    with connected(settings) as store:
        _, kvs = store.list()
        if raw:
            out = sys.stdout.buffer
            for kv in kvs:
                out.write(kv.key.encode() + b"\n" + kv.value + b"\n")
            out.flush()
            return
        ttl = {}
        for lease in {kv.lease for kv in kvs if kv.lease}:
            try:
                ttl[lease] = store.lease_ttl_left(lease)
            except StoreError:
                ttl[lease] = None
        for kv in kvs:
            try:
                value = json.dumps(json.loads(kv.value.decode()), sort_keys=True)
            except (UnicodeDecodeError, ValueError):
                value = f"NOT JSON: {kv.value[:80]!r}"
            lease = f"lease {kv.lease:x} ({ttl.get(kv.lease)}s left)" if kv.lease else "no lease"
            click.echo(f"{kv.key}  [{lease}, rev {kv.mod_revision}]\n    {value}")


@main.command()
@click.argument("service", required=False, shell_complete=complete_service)
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True, help="Newest N entries.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def history(settings: Settings, service: Optional[str], limit: int, as_json: bool) -> None:
    """Ownership transitions (claimed, released, fenced, moved, failed), oldest first.

    \b
    Examples:
      etcdha history web
      etcdha history --limit 10
    """
    with connected(settings) as store:
        if service is not None:
            known_service(store.snapshot(), service)
        events = store.history(service or "")[-limit:]
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in events], indent=2))
    else:
        click.echo(report.history_rows(events))


@main.command()
@click.argument("service", shell_complete=complete_service)
@click.option("--node", shell_complete=complete_node, help="Only this node's cooldown (default: every node's).")
@click.pass_obj
def cleanup(settings: Settings, service: str, node: Optional[str]) -> None:
    """Clear the failure cooldowns and health-check fail counts of SERVICE, so nodes where it failed may run it
    again and it gets its max_restarts anew.

    \b
    Examples:
      etcdha cleanup web
      etcdha cleanup web --node n1
    """
    with connected(settings) as store:
        known_service(store.snapshot(), service)
        if node:
            count = int(store.delete(model.cooldown_key(store.prefix, service, node)))
            fails = int(store.delete(model.failures_key(store.prefix, service, node)))
        else:
            count = store.delete_prefix(model.cooldown_key(store.prefix, service, ""))
            fails = store.delete_prefix(model.failures_key(store.prefix, service, ""))
        click.echo(f"cleared {count} cooldown(s) and {fails} fail count(s) of {service}")


if __name__ == "__main__":
    main()
