"""`etcdha` command line: thin commands over config, store and report.

Settings come from options or ETCDHA_* environment variables. User errors are
ClickExceptions (exit 1, one clear line, no traceback).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Optional

import click

from etcdha import __version__, config as config_mod, report
from etcdha.errors import ConfigError, StoreError
from etcdha.store import Store


@dataclasses.dataclass
class Settings:
    config_path: Optional[str]
    endpoints: Optional[str]
    prefix: Optional[str]
    timeout: float

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
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(__version__, prog_name="etcdha")
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str], endpoints: Optional[str], prefix: Optional[str],
         timeout: float, verbose: int) -> None:
    """etcdha: run each service, with its virtual IP, on exactly one healthy node.

    \b
    Examples:
      etcdha agent --config /etc/etcdha/agent.yaml
      etcdha --endpoints http://10.0.0.5:2379 status
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Settings(config_path, endpoints, prefix, timeout)


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
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a stable interface).")
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """Show every service's owner and state, and every node's liveness.

    \b
    Examples:
      etcdha --config /etc/etcdha/agent.yaml status
      etcdha status --json | jq '.services.web.owner'
    """
    store = open_store(settings)
    try:
        doc = report.status(store.snapshot())
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else report.table(doc))


if __name__ == "__main__":
    main()
