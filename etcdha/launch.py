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
import shlex
import shutil
import subprocess
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


def _fail(message: str, code: int) -> str:
    return f"{{ printf '%s\\n' {shlex.quote('etcdha-launch: ' + message)} >&2; exit {code}; }}"


def script(argv: Sequence[str], env: Mapping[str, str], directory: Optional[str], cgroup: Path, parent: int,
           pdeathsig: Optional[str]) -> str:
    """The launcher for one start. `env` names are validated by config (letters, digits, '_')."""
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
    lines += [f"export {name}={q(value)}" for name, value in env.items()]
    prefix = [pdeathsig, "--pdeathsig", "KILL", "--"] if pdeathsig else []
    lines.append("exec " + " ".join(q(a) for a in [*prefix, *argv]))
    return "\n".join(lines) + "\n"
