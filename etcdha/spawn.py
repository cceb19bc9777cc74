"""supervisord, run by the fence, starting programs with posix_spawn instead of fork.

    python .../etcdha/spawn.py -n -c RUN_DIR/supervisord.conf

Stock supervisord forks itself for every program: the kernel copies the page tables of a
37 MB Python process, parent and child fault on copy-on-write pages until the child execs,
and the child then tears the copy down. Measured alone (a 30 MB Python parent, the same
launcher, this 2-core VM), that was 1.3-2.9 of the 3.9-5.8 ms of CPU a start cost; with
posix_spawn (glibc: a vfork-style clone sharing the address space until exec) a start cost
2.6-2.9 ms. A takeover of hundreds of services is that cost times hundreds on a busy node.

Only the spawn changes: supervisord still makes the pipes, keeps the state machine, reaps
and logs. The child gets exactly what supervisord's own child code would have done for
the programs etcdha generates: its own process group, stdin/stdout/stderr on supervisord's
pipes, every other descriptor below minfds closed, supervisord's environment plus its
SUPERVISOR_* variables and the program's environment=. A program with user=, directory=
or umask= (etcdha writes none; the launcher does those itself, after entering the cgroup)
or of another process class goes through supervisord's fork as before, and so does any
spawn posix_spawn refuses (then supervisord reports the failure in its own words).

This mirrors supervisord's Subprocess._spawn_as_child (the same in 4.2 and 4.3);
tests/store/test_spawn.py holds every program's view of its start against stock supervisord's.
Stdlib and supervisor only: this runs as supervisord's main module, not inside etcdha.
"""
import os
import sys

if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # etcdha's modules beside this file are not supervisord's

from supervisor import options as _options  # noqa: E402 - after the path fix above
from supervisor import process as _process  # noqa: E402

_spawning: list = []  # the Subprocess whose spawn() runs now (supervisord is one thread)
_fork = _options.ServerOptions.fork
_spawn = _process.Subprocess.spawn


def eligible(proc) -> bool:  # noqa: ANN001 - supervisor's Subprocess
    """Can posix_spawn do all that supervisord's child code would do for this program?"""
    config = proc.config
    return (type(proc) is _process.Subprocess and config.uid is None and config.directory is None
            and config.umask is None)


def environment(proc) -> dict:  # noqa: ANN001
    """The child's environment, as supervisord's _spawn_as_child builds it."""
    config = proc.config
    env = os.environ.copy()
    env["SUPERVISOR_ENABLED"] = "1"
    serverurl = config.serverurl if config.serverurl is not None else config.options.serverurl
    if serverurl:
        env["SUPERVISOR_SERVER_URL"] = serverurl
    env["SUPERVISOR_PROCESS_NAME"] = config.name
    if proc.group:
        env["SUPERVISOR_GROUP_NAME"] = proc.group.config.name
    if config.environment is not None:
        env.update(config.environment)
    return env


def file_actions(proc) -> list:  # noqa: ANN001
    """The pipes onto 0, 1, 2 and every other descriptor below minfds closed, as supervisord's child does."""
    pipes = proc.pipes
    err = pipes["child_stdout"] if proc.config.redirect_stderr else pipes["child_stderr"]
    actions = [(os.POSIX_SPAWN_DUP2, pipes["child_stdin"], 0), (os.POSIX_SPAWN_DUP2, pipes["child_stdout"], 1),
               (os.POSIX_SPAWN_DUP2, err, 2)]
    return actions + [(os.POSIX_SPAWN_CLOSE, fd) for fd in range(3, proc.config.options.minfds)]


def fork(self):  # noqa: ANN001, ANN201 - replaces ServerOptions.fork
    """The child's pid (never 0: supervisord then runs only its parent side), or supervisord's own fork."""
    proc = _spawning[-1] if _spawning else None
    try:
        if proc is not None and eligible(proc):
            filename, argv = proc.get_execv_args()
            return os.posix_spawn(filename, argv, environment(proc), file_actions=file_actions(proc), setpgroup=0)
    except Exception:  # noqa: BLE001 - no child was made (or a supervisor we do not know): its own fork does it all
        pass
    return _fork(self)


def spawn(self):  # noqa: ANN001, ANN201 - wraps Subprocess.spawn
    _spawning.append(self)
    try:
        return _spawn(self)
    finally:
        _spawning.pop()


def install() -> None:
    _options.ServerOptions.fork = fork
    _process.Subprocess.spawn = spawn


if __name__ == "__main__":
    from supervisor import supervisord

    install()
    supervisord.main()
