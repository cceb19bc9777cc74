#!/usr/bin/env python3
"""The demo/test service: answers every HTTP GET with "NODE TOKEN" on the VIP.

etcdha gives it ETCDHA_NODE, ETCDHA_VIP and ETCDHA_FENCING_TOKEN in its environment.
"""
import argparse
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = f"{os.environ.get('ETCDHA_NODE', '?')} {os.environ.get('ETCDHA_FENCING_TOKEN', '?')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default=os.environ.get("ETCDHA_VIP", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default="", help="the service's name (tests find its processes by it)")
    args = parser.parse_args()
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer((args.bind, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
