"""The program launcher: a short sh script per start that enters the service's cgroup, then execs the program.

supervisord runs `/bin/sh SPEC.sh`; the agent writes SPEC.sh (mode 0600) before each start.
supervisord cannot run code between fork and exec, so this is the step in between:
before the program's own code runs, the process is in the service's cgroup, so
everything it forks (daemons that double-fork and `setsid` included) stays inside
and dies with `cgroup.kill`. Then:

- the parent is checked to still be the supervisord that spawned us: if it died while we were
  starting, nobody would know about us, so we exit instead (and we are already in the cgroup,
  so a kill issued after its death catches us anyway);
- the program runs under `setpriv --pdeathsig KILL` where util-linux has it, so it dies with
  supervisord where the kernel can arrange it (the fence's cgroup kill covers the rest);
- argv, environment and directory are written by the agent, every value quoted with
  shlex.quote, so no value of the operator's config passes through supervisord's ini parser
  or is ever parsed as shell code.

A script, not Python: dash starts in about a millisecond, a Python launcher took 20-30 ms of
CPU per start, which at hundreds of services per takeover was most of a cold start.
"""
from __future__ import annotations

import functools
import grp
import pwd
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

SHELL = "/bin/sh"
# exit codes: 125 = our supervisord is gone, 126 = cannot set up (spec, cgroup, directory); the program's own otherwise
GONE, SETUP = 125, 126


@functools.lru_cache(maxsize=1)
def pdeathsig_tool() -> Optional[str]:
    """`setpriv` if it supports --pdeathsig (util-linux 2.33 and later), else None."""
    tool = shutil.which("setpriv")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return tool if "--pdeathsig" in out.stdout else None


@dataclass(frozen=True)
class Identity:
    """Who a service runs as, resolved on this host: dropped to only after it entered its cgroup (as root)."""

    uid: int
    gid: int
    name: Optional[str]  # for HOME/USER/LOGNAME and the supplementary groups; None: a uid without a passwd entry
    home: str = "/"

    def argv(self, tool: str) -> list[str]:
        """`setpriv` arguments that become this identity (supplementary groups from the group database)."""
        groups = ["--init-groups"] if self.name else ["--clear-groups"]
        return [tool, f"--reuid={self.uid}", f"--regid={self.gid}", *groups]

    def environment(self) -> dict[str, str]:
        """What supervisord's user= sets, so a program finds its home."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name} if self.name else {"HOME": self.home}


def resolve_identity(user: Optional[str], group: Optional[str]) -> Optional[Identity]:
    """`user` (name or number) and `group` (name or number; default the user's primary group) on this host.

    Raises LookupError naming what is missing; None when neither is given (root, as the agent).
    """
    if user is None and group is None:
        return None
    uid, gid, name, home = 0, 0, "root", "/root"
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            uid, gid, name, home = entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir
        except KeyError:
            if not user.isdigit():
                raise LookupError(f"no user {user!r} on this host") from None
            uid, gid, name, home = int(user), int(user), None, "/"
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise LookupError(f"no group {group!r} on this host") from None
    return Identity(uid, gid, name, home or "/")


@functools.lru_cache(maxsize=1)
def setpriv_tool() -> Optional[str]:
    """`setpriv` (util-linux): how a program drops to its user after entering its cgroup."""
    return shutil.which("setpriv")


def _fail(message: str, code: int) -> str:
    return f"{{ printf '%s\\n' {shlex.quote('etcdha-launch: ' + message)} >&2; exit {code}; }}"


def script(argv: Sequence[str], env: Mapping[str, str], directory: Optional[str], cgroup: Path, parent: int,
           pdeathsig: Optional[str], identity: Optional[Identity] = None) -> str:
    """The launcher for one start. `env` names are validated by config (letters, digits, '_').

    With an `identity` the program runs as that user and group: setpriv changes them after the
    cgroup was entered (cgroup.procs is root's) and right before exec; pdeathsig is set after the
    change (util-linux sets it last), so it holds for the program."""
    q = shlex.quote
    procs = str(cgroup / "cgroup.procs")
    lines = [
        "# written by etcdha for one start: enter the cgroup, check the parent, exec the program",
        f"echo $$ 2>/dev/null >{q(procs)} || "
        + _fail(f"cannot enter the service's cgroup {cgroup}; not starting uncontained", SETUP),
        f'[ "$PPID" = {int(parent)} ] || ' + _fail(f"supervisord (pid {int(parent)}) is gone; not starting", GONE),
    ]
    if directory:
        lines.append(f"cd {q(directory)} 2>/dev/null || " + _fail(f"cannot change to directory {directory}", SETUP))
    if identity is not None:
        lines += [f"export {name}={q(value)}" for name, value in identity.environment().items() if name not in env]
    lines += [f"export {name}={q(value)}" for name, value in env.items()]
    prefix: list[str] = []
    if identity is not None:
        prefix = identity.argv(setpriv_tool() or "setpriv") + (["--pdeathsig", "KILL"] if pdeathsig else []) + ["--"]
    elif pdeathsig:
        prefix = [pdeathsig, "--pdeathsig", "KILL", "--"]
    lines.append("exec " + " ".join(q(a) for a in [*prefix, *argv]))
    return "\n".join(lines) + "\n"
