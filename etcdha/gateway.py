"""Revoke a lease through etcd's JSON gateway (`POST /v3/lease/revoke`), stdlib only.

Used where gRPC cannot go: by the fence, after the agent died and every service
process is verified dead and every VIP gone, so another node takes over at once
instead of after the lease's TTL (an agent crash becomes a handoff); and by
`python -m etcdha.gateway` for systemd's ExecStopPost=, for the same handoff when
systemd killed the unit. The fence must stay small and start no threads, so no
etcd client library here.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

PASSWORD_ENV = "ETCDHA_ETCD_PASSWORD"  # as etcdha.config (which this stdlib-only module does not import)


def _opener(url: str, ca_cert: Optional[str], cert: Optional[str], key: Optional[str]) -> urllib.request.OpenerDirector:
    handlers: list = [urllib.request.ProxyHandler({})]  # never through an HTTP proxy from the environment
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=ca_cert)
        if cert:
            context.load_cert_chain(cert, key)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def endpoint_url(endpoint: str) -> str:
    return (endpoint if "://" in endpoint else f"http://{endpoint}").rstrip("/")


def password_of(username: Optional[str], password_file: Optional[str]) -> Optional[str]:
    """The etcd password as the agent reads it (its file's first line, else $ETCDHA_ETCD_PASSWORD); None if no user."""
    if not username:
        return None
    if password_file:
        with open(password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return os.environ.get(PASSWORD_ENV, "")


def _token(url: str, opener: urllib.request.OpenerDirector, username: str, password: str, timeout: float) -> str:
    """POST /v3/auth/authenticate: the token for the Authorization header ("" when etcd's auth is off)."""
    body = json.dumps({"name": username, "password": password}).encode()
    request = urllib.request.Request(endpoint_url(url) + "/v3/auth/authenticate", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read(65536) or b"{}").get("token", "")
    except urllib.error.HTTPError as exc:
        detail = exc.read(2048).decode(errors="replace")
        if "authentication is not enabled" in detail:
            return ""
        raise ValueError(f"etcd refused user {username!r}: HTTP {exc.code} {detail.strip()[:200]}") from None


def revoke(endpoints: Sequence[str], lease: int, timeout: float = 1.0, ca_cert: Optional[str] = None,
           cert: Optional[str] = None, key: Optional[str] = None, username: Optional[str] = None,
           password_file: Optional[str] = None) -> tuple[bool, str]:
    """Revoke `lease` on the first endpoint that answers: (True, what happened) or (False, every error).

    With `username`, logs in first (the password from `password_file` or the environment,
    never from an argument). A lease etcd no longer knows counts as revoked: its keys are
    gone either way.
    """
    body = json.dumps({"ID": str(lease)}).encode()
    errors = []
    try:
        password = password_of(username, password_file)
    except OSError as exc:
        return False, f"cannot read the etcd password file {password_file}: {exc.strerror or exc}"
    for endpoint in endpoints:
        url = endpoint_url(endpoint) + "/v3/lease/revoke"
        started = time.monotonic()
        try:
            opener = _opener(url, ca_cert, cert, key)
            headers = {"Content-Type": "application/json"}
            if username:
                token = _token(endpoint, opener, username, password or "", timeout)
                if token:
                    headers["Authorization"] = token
            request = urllib.request.Request(url, data=body, method="POST", headers=headers)
            with opener.open(request, timeout=timeout) as response:
                response.read()
            return True, f"revoked lease {lease:x} at {endpoint} in {(time.monotonic() - started) * 1000:.0f}ms"
        except urllib.error.HTTPError as exc:
            detail = exc.read(2048).decode(errors="replace")
            if "lease not found" in detail:
                return True, f"lease {lease:x} was already gone ({endpoint})"
            errors.append(f"{endpoint}: HTTP {exc.code} {detail.strip()[:200]}")
        except (urllib.error.URLError, OSError, ssl.SSLError, ValueError) as exc:
            errors.append(f"{endpoint}: {getattr(exc, 'reason', exc)}")
    return False, "; ".join(errors) or "no endpoint"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m etcdha.gateway revoke --lease-file F --endpoint URL...: for systemd's ExecStopPost=."""
    parser = argparse.ArgumentParser(prog="etcdha.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["revoke"])
    parser.add_argument("--lease-file", required=True, help="file holding the lease id in hex (the agent writes it)")
    parser.add_argument("--endpoint", action="append", required=True)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--ca-cert")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--username", help=f"etcd user; the password from --password-file or ${PASSWORD_ENV}")
    parser.add_argument("--password-file")
    args = parser.parse_args(argv)
    try:
        with open(args.lease_file) as f:
            lease = int(f.read().strip(), 16)
    except (OSError, ValueError) as exc:
        print(f"etcdha.gateway: no lease to revoke ({exc})", file=sys.stderr)
        return 0
    ok, what = revoke(args.endpoint, lease, args.timeout, args.ca_cert, args.cert, args.key, args.username,
                      args.password_file)
    print(f"etcdha.gateway: {what}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
