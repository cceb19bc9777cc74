"""This node's hands: start, stop and verify services (cgroup, supervisord program, VIP, announcements).

The agent's loop decides; this module carries out a decision on this node and
says whether it held. "Stopped" is strict: supervisord stopped the program, its
cgroup is empty (nothing it forked survives) and its VIP is gone. Only then may
the agent release, hand over or revoke anything in etcd.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from etcdha import cgroup, logs, netlink, supervisord, vip
from etcdha.cgroup import ContainmentError, NodeCgroups, detect_placement
from etcdha.config import Config, Service
from etcdha.errors import ActuatorError, EtcdhaError
from etcdha.fence import FenceClient
from etcdha.supervisord import Supervisor

log = logging.getLogger(__name__)

KILL_GRACE = 5.0  # how long SIGKILLed processes may take to be gone before we call them stuck
PROBE_FRESH = 1.0  # seconds a VIP probe made while the claims went out is trusted by the start that follows


@dataclass(frozen=True)
class Local:
    """What runs here, read at one moment: the facts `decide.plan` needs about this node."""

    programs: Mapping[str, str]   # service -> supervisord state name
    processes: Mapping[str, int]  # service -> processes in its cgroup
    vips_up: frozenset[str]       # services whose VIP is on our interface


class AheadProbe(threading.Thread):
    """One probe of the VIPs of services being claimed, run while the claims go out.

    A takeover of many services started each batch of them with a probe window of its own
    (a tenth of a second on a busy node, twice per takeover); probed beside the claims, the
    start finds the answers ready. Answers are trusted for PROBE_FRESH seconds after the
    probe ended: the probe guards against an address configured on another host, not
    against one added in the same instant (no probe could).
    """

    def __init__(self, ips: Mapping[str, list[str]]):
        super().__init__(name="etcdha-probe", daemon=True)
        self.ips = {interface: list(v) for interface, v in ips.items()}
        self.found: dict[str, dict[str, str]] = {}  # interface -> ip -> MAC of the host answering for it
        self.ended = 0.0

    def run(self) -> None:
        for interface, ips in self.ips.items():
            try:
                self.found[interface] = vip.in_use_elsewhere_many(interface, ips)
            except ActuatorError as exc:
                log.debug("probing ahead: %s", exc)  # the start probes these itself
        self.ended = time.monotonic()

    def answers(self, interface: str, ips: list[str]) -> Optional[dict[str, str]]:
        """ip -> MAC ("" if nobody answered) for those of `ips` this probe covered, if it is fresh."""
        self.join(PROBE_FRESH)  # it ends within its window unless the node is starved
        found = self.found.get(interface)
        if self.is_alive() or found is None or time.monotonic() - self.ended > PROBE_FRESH:
            return None
        covered = set(self.ips[interface])
        return {ip: found.get(ip, "") for ip in ips if ip in covered}


class Actuator:
    """Owns the node's cgroup subtree, the fence and supervisord under it, and the VIPs."""

    def __init__(self, config: Config, wake: Callable[[], None] = lambda: None):
        self.config = config
        self.wake = wake
        self.cgroups = NodeCgroups(detect_placement(config.cgroup_root, config.node), config.services)
        self.supervisor = Supervisor(config)
        self.fence: Optional[FenceClient] = None
        self.supervisord_pid = 0
        self.announcing: dict[str, threading.Event] = {}  # service -> cancels its gratuitous ARP rounds
        self.ahead: Optional[AheadProbe] = None
        # (service, interface, address) of every VIP, made once: vips_up runs every cycle
        self._vips = tuple((s.name, s.interface, str(s.vip.ip)) for s in config.services.values() if s.vip is not None)
        self._with_v6 = any(s.vip is not None and s.vip.version == 6 for s in config.services.values())

    # ---- lifecycle ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Before joining: own the cgroup subtree, kill whatever a previous run left, drop leftover VIPs.

        A previous agent killed together with its fence (no systemd to clean up) may have
        left programs running; they die here, before this node can claim anything.
        """
        supervisord.raise_open_files_limit(len(self.config.services))  # before the fence and supervisord start
        # before joining: the lease is written to handoff.json here the moment it is granted (on a fresh
        # /run after boot the first write failed, and a crash before the next lease waited for the TTL)
        self.config.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cgroups.setup()
        left = self.cgroups.leftovers()
        if left:
            log.warning("killing leftover processes from a previous run before joining: %s",
                        ", ".join(f"{n} ({c})" for n, c in sorted(left.items())))
            if not self.cgroups.empty_all(KILL_GRACE):
                raise ContainmentError(f"leftover processes in {self.cgroups.services_dir} survive SIGKILL; "
                                       "not joining while they run")
        for removed in vip.remove_all(self.config.vips):
            log.warning("removed leftover VIP %s (we own nothing yet)", removed)
        for interface in sorted({i for i, _ in self.config.vips}):
            if not vip.keep_secondaries(interface):
                log.info("set net.ipv4.conf.%s.promote_secondaries=1: removing a VIP never removes another",
                         interface)

    def start_runtime(self) -> None:
        """Fence first, supervisord under it: nothing runs here that the fence cannot kill."""
        self.supervisor.prepare()
        self.supervisor.listen(self.wake)  # before supervisord starts: no state event is missed
        fence = FenceClient(self.config.fence_margin, self.config.vips, self.cgroups.services_dir,
                            self.supervisor.command(), on_exit=self._fence_exited, etcd=self.etcd_access(),
                            log_format=logs.chosen())
        # ours once it runs: the lease thread feeds self.fence meanwhile (we may have joined already)
        self.supervisord_pid = fence.start()
        self.fence = fence
        self.supervisor.wait_ready()
        log.info("fence pid %d, supervisord pid %d; services contained in %s (%s)", self.fence.proc.pid,
                 self.supervisord_pid, self.cgroups.services_dir, self.cgroups.placement.why)

    def runtime_alive(self) -> bool:
        return self.fence is not None and self.fence.alive()

    def runtime_exit(self) -> str:
        """Why the fence exited: killed by a signal, or the reason it fired."""
        return self.fence.exit_reason() if self.fence else "not started"

    def feed(self, deadline: float) -> None:
        if self.fence is not None:
            self.fence.feed(deadline)

    def etcd_access(self) -> dict:
        """What the fence (or systemd's ExecStopPost=) needs to revoke our lease after a crash."""
        return self.config.etcd.access()  # the user and the password's file, never the password

    @property
    def handoff_file(self) -> Path:
        return self.config.run_dir / "handoff.json"

    def lease_granted(self, lease: int) -> None:
        """Tell the fence, and leave the same facts for `etcdha stop-post` (systemd's ExecStopPost=)."""
        if self.fence is not None:
            self.fence.lease(lease)
        state = {"lease": f"{lease:x}", "services": str(self.cgroups.services_dir),
                 "vips": [list(v) for v in self.config.vips], "etcd": self.etcd_access()}
        tmp = self.handoff_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.handoff_file)
        except OSError as exc:
            log.warning("cannot write %s (a crash under systemd then waits for the lease TTL): %s",
                        self.handoff_file, exc.strerror)

    def _fence_exited(self, fence: FenceClient) -> None:
        """Runs on the fence's reader thread when it exits: unless we asked, empty everything at once.

        The fence may have been killed (kill -9, the OOM killer) before it could kill
        anything; supervisord dies with it (PDEATHSIG), but daemons in the service
        cgroups would not. One write kills them all, long before our lease can expire.
        """
        if fence.exit_requested or fence is not self.fence:  # asked for, or an older fence's late EOF
            return
        began = time.monotonic()
        try:
            self.cgroups.kill_all()
        except ActuatorError as exc:
            log.error("the fence exited and killing the service cgroups failed: %s", exc)
        removed = vip.remove_all(self.config.vips)
        took = (time.monotonic() - began) * 1000
        log.error("the fence exited (%s): killed every service cgroup and removed %s in %.0f ms",
                  fence.exit_reason(), removed or "no VIPs", took)
        self.wake()

    # ---- facts -----------------------------------------------------------------------------------

    def observe(self) -> Local:
        """Program states, then cgroup counts (in this order: see decide's daemonized rule), then VIPs.

        A program still RUNNING by the events beside an empty cgroup has just died (its
        cgroup told us first): supervisord is asked directly, so the restart need not
        wait for the event to come through its loop. Only those programs take the new
        state: for the others the order above must hold. The count of a RUNNING program's
        cgroup may be up to a second old (populated-ness is always current).
        """
        programs = self.supervisor.states()
        counts = self.cgroups.counts(reuse={name for name, state in programs.items() if state == "RUNNING"})
        died = [s for s in self.config.services if programs.get(s) == "RUNNING" and counts.get(s) == 0]
        if died:
            fresh = self.supervisor.states_of(died)
            programs = {**programs, **fresh}
        return Local(programs, counts, self.vips_up())

    def next_change(self) -> Optional[float]:
        """Seconds until a program is due to change state with no event to wake us (RUNNING after its
        startsecs, a BACKOFF retry, a stop's SIGKILL); None if none is pending."""
        return self.supervisor.next_due()

    def vips_up(self) -> frozenset[str]:
        """Services whose VIP is on its interface: one stdlib netlink dump per cycle."""
        try:
            by_index = netlink.addresses()
            if self._with_v6:
                for index, ips in netlink.addresses(socket.AF_INET6).items():
                    by_index.setdefault(index, set()).update(ips)
        except OSError as exc:
            log.warning("cannot list addresses: %s", exc)
            return frozenset()
        up = set()
        indexes: dict[str, Optional[int]] = {}  # one lookup per interface, not per service
        for name, interface, ip in self._vips:
            if interface not in indexes:
                try:
                    indexes[interface] = socket.if_nametoindex(interface)
                except OSError:
                    indexes[interface] = None  # no such interface: its VIPs are not up
            index = indexes[interface]
            if index is not None and ip in by_index.get(index, ()):
                up.add(name)
        return frozenset(up)

    # ---- verbs -----------------------------------------------------------------------------------

    def probe_ahead(self, services: list[Service]) -> None:
        """Services about to be claimed: probe for their VIPs now, so their start need not (see AheadProbe)."""
        ips: dict[str, list[str]] = {}
        for s in services:
            if s.vip is not None:
                ips.setdefault(s.interface, []).append(str(s.vip.ip))
        if ips:
            self.ahead = AheadProbe(ips)
            self.ahead.start()

    def _in_use_elsewhere(self, interface: str, ips: list[str]) -> dict[str, str]:
        """ip -> MAC of another host answering for it: from the probe ahead where fresh, else probed now."""
        known = (self.ahead.answers(interface, ips) if self.ahead else None) or {}
        found = {ip: mac for ip, mac in known.items() if mac}
        rest = [ip for ip in ips if ip not in known]
        if rest:
            found.update(vip.in_use_elsewhere_many(interface, rest))
        return found

    def start(self, service: Service, token: int) -> None:
        """VIP (probed, added, announced), then the program in its cgroup with the fencing token."""
        failed = self.start_many([(service, token)])
        if service.name in failed:
            raise failed[service.name]

    def start_many(self, items: list[tuple[Service, int]]) -> dict[str, ActuatorError]:
        """Start several services as one batch; returns the failures by service name.

        Per interface: one address dump, one ARP probe window for every VIP we lack (a VIP
        another host answers for is never added), one netlink socket for the adds and one
        announcer; then every program in one supervisord round trip. A takeover of many
        services costs about what one did.
        """
        failed: dict[str, ActuatorError] = {}
        by_interface: dict[str, list[Service]] = {}
        for service, _ in items:
            if service.vip:
                by_interface.setdefault(service.interface, []).append(service)
        for interface, services in by_interface.items():
            try:
                up = vip.ips(interface)
                missing = [str(s.vip.ip) for s in services if str(s.vip.ip) not in up]
                for ip, mac in self._in_use_elsewhere(interface, missing).items():
                    owner = next(s for s in services if str(s.vip.ip) == ip)
                    failed[owner.name] = ActuatorError(f"VIP {ip} is already answered on {interface} by {mac} (not "
                                                       "an etcdha owner?); refusing to add a duplicate")
                todo = [s for s in services if s.name not in failed]
                added = vip.add_many(interface, [str(s.vip) for s in todo])
                announced = []
                for s in todo:
                    result = added[str(s.vip)]
                    if isinstance(result, ActuatorError):
                        failed[s.name] = result
                        continue
                    if result:
                        log.info("added VIP %s on %s", s.vip, interface)
                    announced.append(s)
                events = vip.announce_many(interface, [str(s.vip) for s in announced])
                for s in announced:
                    self.announcing[s.name] = events[str(s.vip)]
            except ActuatorError as exc:
                for s in services:
                    failed.setdefault(s.name, exc)
        ready = [(s, token, self.cgroups.group(s.name)) for s, token in items if s.name not in failed]
        try:
            failed.update(self.supervisor.start_many(ready, self.supervisord_pid))
        except ActuatorError as exc:
            for s, _, _ in ready:
                failed.setdefault(s.name, exc)
        for s, token, _ in ready:
            if s.name not in failed:
                log.info("started %s (fencing token %d)", s.name, token)
        return failed

    def stop(self, service: Service) -> None:
        """Program stop, SIGTERM to what remains, cgroup.kill after stopwaitsecs, then VIP down.

        Returns only when the cgroup is empty and the VIP gone; raises ActuatorError
        (ContainmentError if processes survive) otherwise, and the caller must not release.
        """
        began = time.monotonic()
        group = self.cgroups.group(service.name)
        try:
            # like systemd, SIGCONT after the stop signal: a stopped (SIGSTOP, hung in a debugger) program
            # would otherwise sit out stopwaitsecs before the SIGKILL
            self.supervisor.stop(service, lambda: cgroup.signal_all(group, signal.SIGCONT))
        except ActuatorError as exc:  # supervisord gone or stuck: the cgroup still tells the truth
            log.warning("supervisord could not stop %s (%s); stopping its cgroup directly", service.name, exc)
        try:
            self.cgroups.stop(service.name, KILL_GRACE, began + service.stopwaitsecs)
        finally:
            if service.name in self.announcing:
                self.announcing.pop(service.name).set()
            if service.vip and vip.remove(service.interface, str(service.vip)):
                log.info("removed VIP %s from %s", service.vip, service.interface)
        log.info("stopped %s (its cgroup is empty)", service.name)

    def stop_all(self) -> bool:
        """Graceful end: every program asked to stop at once, each cgroup emptied; True if all are empty."""
        began = time.monotonic()
        try:
            if self.fence is not None:  # else supervisord never ran (we never joined): the cgroups say the rest
                self.supervisor.stop_all(lambda: [cgroup.signal_all(self.cgroups.group(name), signal.SIGCONT)
                                                  for name in self.config.services])
        except EtcdhaError as exc:
            log.warning("stopping programs through supervisord: %s", exc)
        empty = True
        for service in self.config.services.values():
            try:
                self.cgroups.stop(service.name, KILL_GRACE, began + service.stopwaitsecs)
            except ContainmentError as exc:
                log.error("%s", exc)
                empty = False
        self._drop_vips()
        return empty

    def fence_now(self) -> bool:
        """Kill every service process and drop every VIP now; True once the cgroups are verified empty."""
        if self.runtime_alive():
            self.fence.fire()
        empty = self.cgroups.empty_all(KILL_GRACE)
        self._drop_vips()
        return empty

    def _drop_vips(self) -> None:
        for event in self.announcing.values():
            event.set()
        self.announcing.clear()
        for removed in vip.remove_all(self.config.vips):
            log.info("removed VIP %s", removed)

    def shutdown(self) -> None:
        """Stop the fence (it stops supervisord and checks the subtree), then give the cgroups back."""
        if self.fence is not None:
            self.fence.quit()
        self.supervisor.close()
        self.cgroups.release()
        try:
            self.handoff_file.unlink()  # a graceful stop revoked the lease itself
        except OSError:
            pass
