#!/usr/bin/env python3
"""The demo/test service: answers every HTTP GET with "NODE TOKEN" on the VIP.

etcdha gives it ETCDHA_NODE, ETCDHA_VIP and ETCDHA_FENCING_TOKEN in its environment.
"""
import argparse
import os
import signal
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


STATUS = 200  # --status: what every answer says (a service that answers but is broken: 500)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = f"{os.environ.get('ETCDHA_NODE', '?')} {os.environ.get('ETCDHA_FENCING_TOKEN', '?')}\n".encode()
        self.send_response(STATUS)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def detach() -> bool:
    """Double fork + setsid, as init-style daemons do; True in the detached grandchild."""
    if os.fork() > 0:
        return False
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    return True


def linger(ignore_term: bool) -> None:
    """A helper process that stays (forked, so it keeps our command line and its --name marker)."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(100000):
        time.sleep(1)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default=os.environ.get("ETCDHA_VIP", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default="", help="the service's name (tests find its processes by it)")
    parser.add_argument("--daemonize", action="store_true",
                        help="misbehave like an init-style daemon: fork into the background and exit 0")
    parser.add_argument("--orphan", action="store_true",
                        help="also leave a detached helper (setsid, double fork) that only its cgroup holds")
    parser.add_argument("--child-ignores-term", action="store_true",
                        help="also start a child in our process group that ignores SIGTERM")
    parser.add_argument("--status", type=int, default=200, help="answer every GET with this HTTP status")
    args = parser.parse_args()
    global STATUS
    STATUS = args.status
    if args.daemonize and not detach():
        os._exit(0)
    if args.orphan:
        pid = os.fork()
        if pid == 0:
            if detach():
                linger(ignore_term=True)
            os._exit(0)
        os.waitpid(pid, 0)
    if args.child_ignores_term and os.fork() == 0:
        linger(ignore_term=True)
    ThreadingHTTPServer.allow_reuse_address = True
    if ":" in args.bind:  # an IPv6 VIP
        ThreadingHTTPServer.address_family = socket.AF_INET6
    ThreadingHTTPServer((args.bind, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
