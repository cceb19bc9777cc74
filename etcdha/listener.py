"""supervisord's event listener: forwards each event it hears to the agent as one datagram.

    python -I -S .../etcdha/listener.py RUN_DIR/events.sock

supervisord runs this once (an [eventlistener] section, subscribed to the state changes
the agent did not cause and to REMOTE_COMMUNICATION) and writes each event to its stdin;
we send "POOLSERIAL STATE PROCESSNAME" for a state change, "POOLSERIAL MARK DATA" for the
agent's own marker (a REMOTE_COMMUNICATION of type etcdha-mark), and acknowledge. The
agent keeps every program's state from these instead of asking supervisord for all of
them every cycle, which cost O(services) per cycle.
A send waits at most a second for a slow agent (supervisord buffers events
meanwhile); if the agent is not there, the datagram is dropped, and the agent
sees the gap in the pool serial and asks supervisord for everything once.

Stdlib only and run with -I -S, like everything supervisord starts for us.
"""
import socket
import sys

PREFIX = "PROCESS_STATE_"
MARK_TYPE = "etcdha-mark"  # as supervisord.MARK_TYPE (stdlib only here: this file is run on its own)


def fields(line: str) -> dict:
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def main() -> None:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: listener.py SOCKET\n")
        sys.exit(2)
    target = sys.argv[1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return  # supervisord is gone
        header = fields(line.decode(errors="replace"))
        body = stdin.read(int(header.get("len", 0))).decode(errors="replace")
        event, serial = header.get("eventname", ""), header.get("poolserial", "-1")
        message = ""
        if event == "REMOTE_COMMUNICATION":
            kind, _, data = body.partition("\n")
            if kind == "type:" + MARK_TYPE and data.strip().isdigit():
                message = f"{serial} MARK {data.strip()}"
        elif event.startswith(PREFIX):
            payload = fields(body)
            if "processname" in payload:
                message = f"{serial} {event[len(PREFIX):]} {payload['processname']}"
        if not message:  # (someone else's REMOTE_COMMUNICATION): sent all the same, or the gap would
            message = f"{serial} OTHER -"  # in the serials would look like a lost datagram
        try:
            sock.sendto(message.encode(), target)
        except OSError:
            pass  # the agent is away or behind: it notices the gap in the serials
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    main()
