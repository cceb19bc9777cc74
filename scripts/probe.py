#!/usr/bin/env python3
"""Asks a URL who answers, every --interval seconds; prints "MONOTONIC_TIME NODE" ("-" = no answer).

Bounded: stops after --duration seconds or when its stdin closes.
"""
import argparse
import select
import sys
import time
import urllib.request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=0.25)
    parser.add_argument("--duration", type=float, default=600)
    args = parser.parse_args()
    end = time.monotonic() + args.duration
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            with opener.open(args.url, timeout=args.timeout) as resp:
                who = resp.read().decode().split()[0]
        except Exception:  # noqa: BLE001 - any failure is "no answer"
            who = "-"
        print(f"{started:.4f} {who}", flush=True)
        rest = args.interval - (time.monotonic() - started)
        if select.select([sys.stdin], [], [], max(0.0, rest))[0] and not sys.stdin.read(1):
            return


if __name__ == "__main__":
    main()
