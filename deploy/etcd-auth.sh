#!/bin/sh
# etcd users and roles for etcdha: run once, as an etcd administrator, from any host that reaches etcd.
#
#   AGENT_PASSWORD_FILE=/root/etcdha-agent.pw READER_PASSWORD_FILE=/root/etcdha-reader.pw \
#   ROOT_PASSWORD_FILE=/root/etcd-root.pw ENDPOINTS=http://10.0.0.11:2379 PREFIX=/etcdha deploy/etcd-auth.sh
#
# Creates
#   role etcdha-agent   read and write under PREFIX/ (what every agent needs: keys, transactions, watch,
#                       and the revoke of leases its keys hang on)
#   role etcdha-reader  read under PREFIX/ (etcdha status, keys, history; not move, drain, pause, cleanup)
#   user etcdha         with etcdha-agent   -> agent.yaml: etcd.username: etcdha, etcd.password_file
#   user etcdha-reader  with etcdha-reader  -> etcdha --user etcdha-reader --password-file FILE status
# and, if authentication is not enabled yet and ROOT_PASSWORD_FILE is given, the root user and
# `etcdctl auth enable`. Passwords are read from files (first line) and handed to etcdctl on its
# standard input or in ETCDCTL_USER, never on a command line (where ps would show them).
# Running it again changes nothing that exists (users keep their passwords).
set -eu

PREFIX="${PREFIX:-/etcdha}"
ENDPOINTS="${ENDPOINTS:-http://127.0.0.1:2379}"
: "${AGENT_PASSWORD_FILE:?set AGENT_PASSWORD_FILE: a file whose first line is the agents password}"
: "${READER_PASSWORD_FILE:?set READER_PASSWORD_FILE: a file whose first line is the read-only password}"
case "$PREFIX" in /*) ;; *) echo "etcd-auth.sh: PREFIX must start with / (got $PREFIX)" >&2; exit 2 ;; esac

first_line() { head -n 1 "$1" | tr -d '\r\n'; }
ctl() { ETCDCTL_API=3 etcdctl --endpoints="$ENDPOINTS" "$@"; }
# the password twice (etcdctl asks again to confirm), on stdin; etcdctl's complaints about stdin not being
# a terminal are dropped, anything else is shown
add_user() {
  pw="$(first_line "$2")"
  out="$(printf '%s\n%s\n' "$pw" "$pw" | ctl user add "$1" --interactive=true 2>&1)" || {
    printf '%s\n' "$out" | grep -v '^stty:' >&2; return 1; }
}
exists() { ctl "$1" list 2>/dev/null | grep -qx "$2"; }

if ctl user list >/dev/null 2>&1; then  # answers without a user: authentication is off
  if [ -n "${ROOT_PASSWORD_FILE:-}" ]; then
    exists user root || add_user root "$ROOT_PASSWORD_FILE"
    ctl user grant-role root root >/dev/null
    enable=1
  else
    echo "etcd-auth.sh: authentication is off on $ENDPOINTS; set ROOT_PASSWORD_FILE to turn it on" >&2
  fi
else
  : "${ROOT_PASSWORD_FILE:?authentication is on: set ROOT_PASSWORD_FILE (a file with the root users password)}"
  ETCDCTL_USER="root:$(first_line "$ROOT_PASSWORD_FILE")"
  export ETCDCTL_USER
fi

exists role etcdha-agent || ctl role add etcdha-agent >/dev/null
ctl role grant-permission etcdha-agent --prefix=true readwrite "$PREFIX/" >/dev/null
exists role etcdha-reader || ctl role add etcdha-reader >/dev/null
ctl role grant-permission etcdha-reader --prefix=true read "$PREFIX/" >/dev/null
exists user etcdha || add_user etcdha "$AGENT_PASSWORD_FILE"
ctl user grant-role etcdha etcdha-agent >/dev/null
exists user etcdha-reader || add_user etcdha-reader "$READER_PASSWORD_FILE"
ctl user grant-role etcdha-reader etcdha-reader >/dev/null

if [ -n "${enable:-}" ]; then
  ctl auth enable >/dev/null
  echo "etcd-auth.sh: authentication enabled on $ENDPOINTS"
fi
echo "etcd-auth.sh: roles etcdha-agent (readwrite) and etcdha-reader (read) on $PREFIX/; users etcdha, etcdha-reader"
