"""The program launcher: supervisord runs this, it enters the service's cgroup, then execs the program.

    python -I -S .../etcdha/launch.py SPEC.json

supervisord cannot run code between fork and exec, so this is the step in
between: before the program's own code runs, the process is in the service's
cgroup, so everything it forks (daemons that double-fork and `setsid` included)
stays inside and dies with `cgroup.kill`. Then:

- PR_SET_PDEATHSIG(SIGKILL): the program dies with supervisord where the kernel can arrange it;
- the parent is checked to still be the supervisord that spawned us: if it died while we were
  starting, nobody would know about us, so we exit instead (and we are already in the cgroup,
  so a kill issued after its death catches us anyway);
- argv, environment and directory come from SPEC (written by the agent, 0600), so no value
  of the operator's config ever passes through supervisord's ini parser.

Stdlib only and run with -I -S: it must start fast and import nothing from the venv.
"""
import ctypes
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def fail(message: str, code: int) -> "None":
    sys.stderr.write(f"etcdha-launch: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: launch.py SPEC.json", 2)
    try:
        with open(sys.argv[1]) as f:
            spec = json.load(f)
        argv, env, cgroup, parent = spec["argv"], spec["env"], spec["cgroup"], int(spec["parent"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"cannot read the launch spec {sys.argv[1]}: {exc}", 126)
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        fail(f"cannot enter the service's cgroup {cgroup}: {exc.strerror}; not starting uncontained", 126)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        fail(f"supervisord (pid {parent}) is gone; not starting", 125)
    if spec.get("directory"):
        try:
            os.chdir(spec["directory"])
        except OSError as exc:
            fail(f"cannot change to directory {spec['directory']}: {exc.strerror}", 126)
    environment = dict(os.environ)
    environment.update(env)
    try:
        os.execvpe(argv[0], argv, environment)
    except OSError as exc:
        fail(f"cannot execute {argv[0]}: {exc.strerror}", 127)


if __name__ == "__main__":
    main()
