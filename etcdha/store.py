"""The only module that talks to etcd.

It drives etcd's gRPC API through the stubs generated in the `etcd3` package
(python3-etcd3) rather than its client class: we need per-call deadlines, quick
reconnects after an etcd restart, endpoint rotation, and a watch whose
lifecycle we own (the library's watcher dies silently on errors).

Every call has a deadline (`timeout`) and raises `Unavailable` when etcd cannot
answer in time, `StoreError` for anything else; nothing here blocks forever.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from etcdha import model
from etcdha.config import EtcdConfig, parse_endpoint
from etcdha.errors import AuthError, ConfigError, StoreError, Unavailable

log = logging.getLogger(__name__)

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
_AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
_AUTH_WORDS = ("auth", "permission denied", "user name", "password", "user ID")


@dataclass
class _Auth:
    """Our etcd user and the token etcd gave it (None until we log in, and after etcd forgot it)."""

    etcd: EtcdConfig
    token: Optional[str] = None


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list):
        self.method, self.timeout, self.metadata = base.method, base.timeout, metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Every call, streams (watch, keepalive) included, carries our auth token: one place, not every call site."""

    def __init__(self, auth: _Auth):
        self.auth = auth

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if not self.auth.token:
            return details
        return _CallDetails(details, list(details.metadata or []) + [("token", self.auth.token)])

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001 - grpc's API
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001
        return continuation(self._with_token(details), requests)


_CHANNEL_OPTIONS = [
    # After an etcd restart reconnect within ~1 s instead of gRPC's default backoff of up to 2 min.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A new Store must not inherit another channel's reconnect backoff (gRPC shares subchannels
    # process-wide by default): a fresh store would fail fast with a stale "connection refused".
    ("grpc.use_local_subchannel_pool", 1),
    # Notice a silently dead connection (etcd's default minimum ping interval is 5 s).
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 3000),
]


TXN_OPS = 100  # operations per transaction we send; etcd's default --max-txn-ops is 128


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end[: len(end)])
        end.pop()
    return b"\0"


def _translate(func: Callable) -> Callable:
    """Map gRPC errors to StoreError/Unavailable in one place; move on to the next endpoint on failure.

    A call refused outright (UNAVAILABLE: the member is down, nothing was applied) or
    cut off by our own switch of endpoint (CANCELLED) is tried once on each other
    endpoint at once; a timeout is not retried (it may have been applied), the next
    call goes to the next endpoint.
    """

    @functools.wraps(func)
    def wrapper(self: "Store", *args, **kwargs):
        reauthenticated = False
        attempt = 0
        while attempt < len(self._targets):
            attempt += 1
            index = self._index
            began = time.monotonic()
            try:
                if self._auth is not None and self._auth.token is None:
                    self._authenticate()
                result = func(self, *args, **kwargs)
                if self.observer is not None:
                    self.observer(func.__name__, time.monotonic() - began, None)
                return result
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if self.observer is not None:
                    self.observer(func.__name__, time.monotonic() - began, code.name if code else "UNKNOWN")
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                failed = self._endpoint_at(index)
                if code in _AUTH_CODES and any(word in detail for word in _AUTH_WORDS):
                    if "invalid auth token" in detail and self._auth is not None and not reauthenticated:
                        self._auth.token = None  # expired, or etcd restarted: log in again, once
                        reauthenticated = True
                        attempt -= 1
                        continue
                    raise self._auth_error(failed, func.__name__, detail) from None
                if code not in _UNAVAILABLE:
                    raise StoreError(f"etcd at {failed} refused {func.__name__}: {detail}") from None
                self._rotate(index)
                retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                if retry and attempt < len(self._targets):  # (attempt counts from 1)
                    continue
                raise Unavailable(f"etcd at {failed} did not answer {func.__name__} "
                                  f"within {self.timeout:g}s ({code.name if code else '?'}: {detail})") from None
        raise AssertionError("unreachable")

    return wrapper


class Store:
    """A connection to etcd plus the key operations etcdha needs, all under one prefix."""

    def __init__(self, etcd: EtcdConfig):
        self.prefix = etcd.prefix
        self.timeout = etcd.timeout
        self.last_change = 0  # revision of our last claim or release: an agent plans on no older view
        # called after every call with (method, seconds, gRPC code name or None): the agent's metrics
        self.observer: Optional[Callable[[str, float, Optional[str]], None]] = None
        self._change_lock = threading.Lock()  # claims run on several threads at once
        self._targets = [parse_endpoint(ep, "etcd endpoint") for ep in etcd.endpoints]
        self._auth = _Auth(etcd) if etcd.username else None
        self._creds = self._credentials(etcd)
        self._lock = threading.Lock()
        self._index = 0
        self._channel: Optional[grpc.Channel] = None
        self._connect()

    # ---- connection --------------------------------------------------------------------

    @staticmethod
    def _credentials(etcd: EtcdConfig) -> Optional[grpc.ChannelCredentials]:
        if not (etcd.ca_cert or any(tls for _, _, tls in [parse_endpoint(e) for e in etcd.endpoints])):
            return None
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        try:
            return grpc.ssl_channel_credentials(read(etcd.ca_cert), read(etcd.key), read(etcd.cert))
        except OSError as exc:
            raise StoreError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None

    @property
    def endpoint(self) -> str:
        return self._endpoint_at(self._index)

    def _endpoint_at(self, index: int) -> str:
        host, port, tls = self._targets[index]
        return f"{'https' if tls else 'http'}://{host}:{port}"

    def _connect(self) -> None:
        host, port, tls = self._targets[self._index]
        target = f"{host}:{port}"
        if tls and self._creds is not None:
            channel = grpc.secure_channel(target, self._creds, options=_CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        old, self._channel = self._channel, channel
        self.auth_stub = etcdrpc.AuthStub(channel)  # logging in carries no token
        if self._auth is not None:
            channel = grpc.intercept_channel(channel, _TokenInterceptor(self._auth))
        self.kv = etcdrpc.KVStub(channel)
        self.leases = etcdrpc.LeaseStub(channel)
        self.watch_stub = etcdrpc.WatchStub(channel)
        if old is not None:
            old.close()

    def _authenticate(self) -> None:
        """Log in as etcd.username (the password read now, from its file or the environment); raises grpc.RpcError."""
        assert self._auth is not None
        try:
            password = self._auth.etcd.password()
        except ConfigError as exc:
            raise AuthError(str(exc)) from None
        try:
            resp = self.auth_stub.Authenticate(etcdrpc.AuthenticateRequest(name=self._auth.etcd.username,
                                                                          password=password or ""),
                                               timeout=self.timeout)
        except grpc.RpcError as exc:
            detail = exc.details() if hasattr(exc, "details") else ""
            if "authentication is not enabled" in (detail or ""):
                if self._auth.token is None:
                    log.warning("etcd at %s has authentication disabled: etcd.username %r is not used", self.endpoint,
                                self._auth.etcd.username)
                self._auth.token = ""  # calls go without a token
                return
            raise
        self._auth.token = resp.token

    def _auth_error(self, endpoint: str, method: str, detail: str) -> AuthError:
        """One clear line for what the operator must fix: the user, the password or the user's role."""
        user = self._auth.etcd.username if self._auth else None
        if "permission denied" in detail:
            return AuthError(f"etcd at {endpoint} denies {method} under {self.prefix} to user {user!r} ({detail}): "
                             "give the user a role with read-write access to the prefix (deploy/etcd-auth.sh); a "
                             "read-only user serves the CLI's read commands, not an agent")
        if "authentication failed" in detail or "user ID" in detail or "password" in detail:
            return AuthError(f"etcd at {endpoint} refused user {user!r}: wrong user name or password ({detail})")
        if "user name is empty" in detail or user is None:
            return AuthError(f"etcd at {endpoint} requires authentication ({detail}): set etcd.username and "
                             "etcd.password_file in the config, or --user and --password-file")
        return AuthError(f"etcd at {endpoint} refused user {user!r}: {detail}")

    def _rotate(self, failed: int) -> None:
        """Move off endpoint `failed` to the next one, unless another thread already did."""
        if len(self._targets) < 2:
            return
        with self._lock:
            if self._index != failed:
                return
            self._index = (self._index + 1) % len(self._targets)
            self._connect()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    # ---- reads ---------------------------------------------------------------------------

    def _ranges(self) -> list[tuple[bytes, bytes]]:
        """The prefix minus its history subtree: what agents snapshot and watch."""
        start = (self.prefix + "/").encode()
        history = model.history_prefix(self.prefix).encode()
        return [(start, history), (prefix_end(history), prefix_end(start))]

    @staticmethod
    def _kvs(raw) -> list[model.KV]:  # noqa: ANN001 - protobuf repeated field
        return [model.KV(key=kv.key.decode(errors="replace"), value=kv.value, create_revision=kv.create_revision,
                         mod_revision=kv.mod_revision, lease=kv.lease) for kv in raw]

    @_translate
    def list(self, sub: str = "") -> tuple[int, list[model.KV]]:
        """Linearizable read of every key under prefix/sub; returns (revision, kvs). Fails without a leader."""
        key = (self.prefix + "/" + sub).encode()
        resp = self.kv.Range(etcdrpc.RangeRequest(key=key, range_end=prefix_end(key)), timeout=self.timeout)
        return resp.header.revision, self._kvs(resp.kvs)

    @_translate
    def listing(self) -> tuple[int, list[model.KV]]:
        """Every key of the cluster state (history excluded) at one revision, read atomically."""
        ops = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=a, range_end=b)) for a, b in self._ranges()]
        resp = self._txn([], ops)
        return resp.header.revision, [kv for r in resp.responses for kv in self._kvs(r.response_range.kvs)]

    @_translate
    def last_watched_change(self) -> int:
        """The newest mod_revision among the watched keys (linearizable): what a watch must have applied to be current.

        Not the store's revision: history writes are not watched, so a watch may never reach that.
        """
        ops = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
            key=a, range_end=b, limit=1, keys_only=True, sort_order=etcdrpc.RangeRequest.DESCEND,
            sort_target=etcdrpc.RangeRequest.MOD)) for a, b in self._ranges()]
        resp = self._txn([], ops)
        return max((kv.mod_revision for r in resp.responses for kv in r.response_range.kvs), default=0)

    def snapshot(self) -> model.ClusterView:
        """The whole cluster state (history excluded) at one revision, read atomically."""
        revision, kvs = self.listing()
        return model.build_view(self.prefix, revision, kvs)

    def _note_change(self, revision: int) -> None:
        with self._change_lock:
            self.last_change = max(self.last_change, revision)

    @_translate
    def revision(self) -> int:
        """Current revision of the store (a cheap linearizable read)."""
        key = (self.prefix + "/").encode()  # inside the prefix: a role limited to PREFIX/ may read it
        resp = self.kv.Range(etcdrpc.RangeRequest(key=key, count_only=True), timeout=self.timeout)
        return resp.header.revision

    @_translate
    def lease_ttl_left(self, lease: int) -> int:
        """Seconds left on `lease` as etcd sees it; -1 if it no longer exists."""
        resp = self.leases.LeaseTimeToLive(etcdrpc.LeaseTimeToLiveRequest(ID=lease), timeout=self.timeout)
        return resp.TTL

    # ---- leases ----------------------------------------------------------------------------

    @_translate
    def grant(self, ttl: int) -> tuple[int, int]:
        """Grant a new lease; returns (id, ttl granted by etcd)."""
        resp = self.leases.LeaseGrant(etcdrpc.LeaseGrantRequest(TTL=ttl), timeout=self.timeout)
        if resp.error:
            raise StoreError(f"etcd refused a lease of {ttl}s: {resp.error}")
        return resp.ID, resp.TTL

    @_translate
    def keepalive(self, lease: int, timeout: Optional[float] = None) -> int:
        """Renew `lease` once; returns the TTL etcd reset it to, 0 if the lease is gone.

        Timing-critical: the caller must take its send time *before* calling, since etcd
        restarts the TTL when it receives the request, not when we get the answer.
        """
        responses = self.leases.LeaseKeepAlive(iter([etcdrpc.LeaseKeepAliveRequest(ID=lease)]),
                                               timeout=timeout or self.timeout)
        for resp in responses:
            return resp.TTL
        return 0

    @_translate
    def revoke(self, lease: int) -> None:
        """Revoke `lease`: etcd deletes every key attached to it in one revision."""
        try:
            self.leases.LeaseRevoke(etcdrpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    # ---- writes ------------------------------------------------------------------------------

    def _txn(self, compare: Sequence[etcdrpc.Compare], success: Sequence[etcdrpc.RequestOp],
             failure: Sequence[etcdrpc.RequestOp] = ()) -> etcdrpc.TxnResponse:
        return self.kv.Txn(etcdrpc.TxnRequest(compare=compare, success=success, failure=failure),
                           timeout=self.timeout)

    @staticmethod
    def _put(key: str, value: bytes, lease: int = 0) -> etcdrpc.RequestOp:
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease))

    @staticmethod
    def _delete(key: str) -> etcdrpc.RequestOp:
        return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key.encode()))

    @_translate
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Unconditional put; returns the new revision."""
        return self.kv.Put(etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease),
                           timeout=self.timeout).header.revision

    @_translate
    def delete(self, key: str) -> bool:
        """Unconditional delete; True if the key existed."""
        return self.kv.DeleteRange(etcdrpc.DeleteRangeRequest(key=key.encode()), timeout=self.timeout).deleted > 0

    @_translate
    def register(self, node: str, lease: int, node_value: bytes, candidates: Mapping[str, bytes],
                 services: Mapping[str, bytes]) -> Optional[model.KV]:
        """Node key on `lease` if no other lease holds it; then member, service and candidate keys.

        Returns None on success, else the node key another lease holds (another agent with
        our name, or our own previous incarnation's, not yet expired), and writes nothing.
        The node key is one transaction (the guard); the rest follows in transactions of at
        most TXN_OPS operations, so any number of services fits etcd's default
        --max-txn-ops (128). Atomicity is not needed there: a missing candidate key is
        re-enrolled by the agent's next cycle. If a later write fails, the lease is revoked
        (best effort) so a retry does not find our own half-registered node key.
        """
        key = model.node_key(self.prefix, node)
        free = [etcdrpc.Compare(key=key.encode(), target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL,
                                create_revision=0)]
        resp = self._txn(free, [self._put(key, node_value, lease)],
                         [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key.encode()))])
        if not resp.succeeded:
            held = self._kvs(resp.responses[0].response_range.kvs)
            if not held or held[0].lease != lease:  # (our own lease: a retry of this call on another endpoint)
                return held[0] if held else None
        ops = [self._put(model.member_key(self.prefix, node), node_value)]
        ops += [self._put(model.service_key(self.prefix, svc), value) for svc, value in services.items()]
        ops += [self._put(model.candidate_key(self.prefix, svc, node), value, lease)
                for svc, value in candidates.items()]
        try:
            for i in range(0, len(ops), TXN_OPS):
                self._txn([], ops[i:i + TXN_OPS])
        except grpc.RpcError:
            try:
                self.leases.LeaseRevoke(etcdrpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout)
            except grpc.RpcError:
                pass
            raise
        return None

    @_translate
    def claim(self, service: str, node: str, lease: int, since: float, complete_move: bool = False) -> Optional[int]:
        """Create the owner key on `lease` only if it is absent.

        Atomic (one txn: create_revision == 0). Returns the fencing token (the key's
        create_revision) on success, None if someone else owns the service. When we are
        the target of a move (`complete_move`), the move request is deleted in the same
        transaction, so a completed move leaves nothing behind.
        """
        key = model.owner_key(self.prefix, service)
        cmp = [etcdrpc.Compare(key=key.encode(), target=etcdrpc.Compare.CREATE,
                               result=etcdrpc.Compare.EQUAL, create_revision=0)]
        ops = [self._put(key, model.encode_owner(node, lease, since), lease)]
        if complete_move:
            ops.append(self._delete(model.move_key(self.prefix, service)))
        resp = self._txn(cmp, ops)
        if resp.succeeded:
            self._note_change(resp.header.revision)
        return resp.header.revision if resp.succeeded else None

    @_translate
    def request_move(self, service: str, source: str, to: str, token: int, timeout: int) -> bool:
        """Ask the owner (still holding `token`) to hand `service` to `to`.

        The request hangs on a fresh lease of `timeout` seconds: if the move does not
        complete, it disappears by itself and normal election resumes. False if the
        owner changed meanwhile or another move is pending.
        """
        lease, _ = self.grant(timeout)
        owner = model.owner_key(self.prefix, service).encode()
        move = model.move_key(self.prefix, service)
        cmp = [etcdrpc.Compare(key=owner, target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL,
                               create_revision=token),
               etcdrpc.Compare(key=move.encode(), target=etcdrpc.Compare.CREATE, result=etcdrpc.Compare.EQUAL,
                               create_revision=0)]
        ok = self._txn(cmp, [self._put(move, model.encode_move(to, source, token, time.time()), lease)]).succeeded
        if not ok:
            self.revoke(lease)
        return ok

    def record(self, event: model.Event, keep: int = 100) -> None:
        """Append a history entry for event.service and drop the oldest beyond `keep` (see record_many)."""
        self.record_many([event], keep)

    @_translate
    def record_many(self, events: Sequence[model.Event], keep: int = 100) -> None:
        """Append history entries (in order) and drop each service's oldest beyond `keep`.

        A few transactions for many entries (a takeover records two per service): the puts,
        one listing per service of its entries, the deletes, TXN_OPS operations at most each.
        Deletes exact keys only, and only keys of the form this function writes: a range
        delete could reach keys that are not ours (another cluster whose prefix happens to
        lie inside our history subtree). Not atomic, and need not be: history is best effort.
        """
        puts = [self._put(f"{model.history_prefix(self.prefix, e.service)}{model.history_id(e)}",
                          model.encode_event(e)) for e in events]
        for i in range(0, len(puts), TXN_OPS):
            self._txn([], puts[i:i + TXN_OPS])
        bases = sorted({model.history_prefix(self.prefix, e.service).encode() for e in events})
        stale: list[bytes] = []
        for i in range(0, len(bases), TXN_OPS):
            chunk = bases[i:i + TXN_OPS]
            resp = self._txn([], [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
                key=base, range_end=prefix_end(base), keys_only=True)) for base in chunk])
            for base, r in zip(chunk, resp.responses):
                ours = sorted(kv.key for kv in r.response_range.kvs
                              if model.is_history_id(kv.key[len(base):].decode(errors="replace")))
                stale += ours[:max(0, len(ours) - keep)]
        for i in range(0, len(stale), TXN_OPS):
            self._txn([], [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))
                           for key in stale[i:i + TXN_OPS]])

    def history(self, service: str = "") -> list[model.Event]:
        """History entries, oldest first (all services, or one)."""
        _, kvs = self.list("history/" + (service + "/" if service else ""))
        events, _ = model.decode_events(self.prefix, kvs)
        return sorted(events, key=lambda e: e.time)

    @_translate
    def delete_prefix(self, key: str) -> int:
        """Delete every key starting with `key`; returns how many."""
        start = key.encode()
        return self.kv.DeleteRange(etcdrpc.DeleteRangeRequest(key=start, range_end=prefix_end(start)),
                                   timeout=self.timeout).deleted

    @_translate
    def add_failure(self, service: str, node: str, when: float, timeout: float, check: str,
                    output: str) -> model.Failures:
        """Append one health-check failure to the record of `service` on `node`; returns the new record.

        Read, then write only if the key did not change meanwhile (`etcdha cleanup` may
        delete it at any time: a failure must not bring back the counts it cleared).
        Noted as our change, so the next plan sees the new count.
        """
        key = model.failures_key(self.prefix, service, node)
        for _ in range(5):
            resp = self.kv.Range(etcdrpc.RangeRequest(key=key.encode()), timeout=self.timeout)
            kvs = self._kvs(resp.kvs)
            old = model.decode_failures(kvs[0], []) if kvs else None
            record = (old or model.Failures()).add(when, timeout, check, output)
            mod = kvs[0].mod_revision if kvs else 0
            cmp = etcdrpc.Compare(key=key.encode(), target=etcdrpc.Compare.MOD, result=etcdrpc.Compare.EQUAL,
                                  mod_revision=mod)
            txn = self._txn([cmp], [self._put(key, model.encode_failures(record))])
            if txn.succeeded:
                self._note_change(txn.header.revision)
                return record
        raise StoreError(f"{key}: changed under every one of 5 writes")

    @_translate
    def release(self, service: str, lease: int) -> bool:
        """Delete the owner key only if it still hangs on `lease` (ours); True if deleted."""
        key = model.owner_key(self.prefix, service)
        cmp = etcdrpc.Compare(key=key.encode(), target=etcdrpc.Compare.LEASE,
                              result=etcdrpc.Compare.EQUAL, lease=lease)
        resp = self._txn([cmp], [self._delete(key)])
        if resp.succeeded:
            self._note_change(resp.header.revision)
        return resp.succeeded

    @_translate
    def owners(self, services: Sequence[str]) -> dict[str, model.KV]:
        """Linearizable: the owner keys of `services` that exist now, in one transaction.

        What the agent checks right before starting a program, so a view that lags
        behind etcd (the watch is a few events behind) can never start one it no
        longer owns.
        """
        found: dict[str, model.KV] = {}
        for i in range(0, len(services), TXN_OPS):
            chunk = services[i:i + TXN_OPS]
            ops = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=model.owner_key(self.prefix, s).encode()))
                   for s in chunk]
            resp = self._txn([], ops)
            for service, r in zip(chunk, resp.responses):
                kvs = self._kvs(r.response_range.kvs)
                if kvs:
                    found[service] = kvs[0]
        return found

    # ---- watch ---------------------------------------------------------------------------------

    def watcher(self, wake: Callable[[], None]) -> "Watcher":
        return Watcher(self, wake)

    def informer(self, wake: Callable[[], None]) -> "Informer":
        return Informer(self, wake)


class Watcher(threading.Thread):
    """Watches the whole prefix and calls `wake()` on every change; never carries data.

    It owns its lifecycle: after any error, cancel or compaction it reconnects and
    resumes from the last revision it saw (or, after a compaction, from now), and
    calls `wake()` so the agent re-reads the full state it may have missed.
    """

    # Resume after a progress notification's revision? Only where nothing is kept from events:
    # etcd 3.4 can send one ahead of events it has not delivered yet.
    trust_progress = True

    def __init__(self, store: Store, wake: Callable[[], None]):
        super().__init__(name="etcdha-watch", daemon=True)
        self.store = store
        self.wake = wake
        self.stopping = threading.Event()
        self.revision = 0  # last revision seen
        self.connected = threading.Event()  # set while a watch stream is established
        self.restarts = 0
        self.last_heard = 0.0  # monotonic time of the last answer on the stream (events or progress)
        self._call = None
        self._requests: "Optional[queue.Queue[Optional[etcdrpc.WatchRequest]]]" = None

    def stop(self) -> None:
        self.stopping.set()
        call = self._call
        if call is not None:
            call.cancel()

    def run(self) -> None:
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                if self.revision == 0:
                    self._start_over()
                self._watch_once()
                backoff = 0.1
            except Unavailable as exc:
                log.debug("watch: %s", exc)
            except grpc.RpcError as exc:
                if not self.stopping.is_set():
                    log.info("watch stream broke (%s); resuming from revision %d", exc.code(), self.revision + 1)
            except Exception:  # noqa: BLE001 - the watch must never die silently
                log.exception("watch: unexpected error; restarting it")
            finally:
                self.connected.clear()
            self.restarts += 1
            self.wake()
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _start_over(self) -> None:
        """No revision to resume from (first start, or compacted): watch from now."""
        self.revision = self.store.revision()

    def _apply(self, events) -> None:  # noqa: ANN001 - protobuf repeated field
        """Events of one watch response, in order (the Informer keeps its copy of the keys from them)."""

    def request_progress(self) -> None:
        """Ask etcd for a progress notification on the stream: proof that the watch is alive."""
        requests = self._requests
        if requests is not None:
            requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))

    def restart(self) -> None:
        """Drop the stream (e.g. it stopped answering); run() reconnects and resumes."""
        call = self._call
        if call is not None:
            call.cancel()

    def _watch_once(self) -> None:
        requests: "queue.Queue[Optional[etcdrpc.WatchRequest]]" = queue.Queue()
        self._requests = requests
        for start, end in self.store._ranges():  # history writes do not wake agents
            requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=start, range_end=end, start_revision=self.revision + 1, progress_notify=True)))

        def outgoing() -> Iterator[etcdrpc.WatchRequest]:
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        self._call = call = self.store.watch_stub.Watch(outgoing())
        try:
            for resp in call:
                if self.stopping.is_set():
                    return
                self.last_heard = time.monotonic()
                if resp.created:
                    self.connected.set()
                    self.wake()  # we may have missed changes while not watching
                if resp.compact_revision:
                    log.warning("watch: revision %d was compacted; re-reading from now", self.revision + 1)
                    self.revision = 0
                    return
                if resp.canceled:
                    log.info("watch canceled by etcd: %s", resp.cancel_reason)
                    return
                if resp.events:
                    self._apply(resp.events)
                    self.revision = max(self.revision, max(ev.kv.mod_revision for ev in resp.events))
                    self.wake()
                elif not resp.created and self.trust_progress:  # progress: nothing pending below it
                    self.revision = max(self.revision, resp.header.revision)
        finally:
            self._requests = None
            requests.put(None)
            call.cancel()
            self._call = None



class Informer(Watcher):
    """The agent's copy of the cluster state, kept from the watch: list once, then apply events.

    Idle cost no longer grows with the number of services: a cycle reads this copy,
    not the prefix. After a compaction (or at start) it lists again; after a broken
    stream it resumes from its revision, so no event is lost. `view()` is None unless
    the stream answered within `stale_after` seconds: the agent asks for a progress
    notification every reconcile (`request_progress`) next to a linearizable read, so
    a watch that silently stopped (a member cut off from the leader) is noticed and
    restarted, and the agent meanwhile decides nothing.
    """

    trust_progress = False  # resume only from the last event applied: never skip one

    def __init__(self, store: Store, wake: Callable[[], None]):
        super().__init__(store, wake)
        self._builder = model.ViewBuilder(store.prefix)  # our copy: keys noted by the watch, decoded by view()
        self._view: Optional[model.ClusterView] = None
        self._lock = threading.Condition()
        self.synced = threading.Event()  # set once a listing is loaded
        self.lists = 0

    def _start_over(self) -> None:
        revision, kvs = self.store.listing()
        with self._lock:
            self._builder.reset(kvs)
            self.revision = revision
            self._view = None
            self._lock.notify_all()
        self.lists += 1
        self.synced.set()

    def _apply(self, events) -> None:  # noqa: ANN001 - protobuf repeated field
        history = model.history_prefix(self.store.prefix)
        with self._lock:
            for ev in events:
                key = ev.kv.key.decode(errors="replace")
                if key.startswith(history):
                    continue
                if ev.type == kv_pb2.Event.DELETE:
                    self._builder.delete(key)
                else:
                    self._builder.put(self.store._kvs([ev.kv])[0])
            # with the keys, under the same lock: a view never claims a revision older than its content
            self.revision = max(self.revision, max(ev.kv.mod_revision for ev in events))
            self._view = None
            self._lock.notify_all()

    def caught_up(self, revision: int, timeout: float) -> bool:
        """Wait until the events up to `revision` are applied (or `timeout` s); True if they are."""
        with self._lock:
            return self._lock.wait_for(lambda: self.revision >= revision, timeout)

    def view(self, stale_after: float) -> Optional[model.ClusterView]:
        """The cluster as of the last event, or None if the stream has not answered for `stale_after` s."""
        if not (self.synced.is_set() and self.connected.is_set()):
            return None
        if time.monotonic() - self.last_heard > stale_after:
            return None
        with self._lock:
            if self._view is None:  # rebuilt only after a change, from the keys that changed: an idle cycle
                self._view = self._builder.view(self.revision)  # costs nothing here, a busy one little
            return self._view
