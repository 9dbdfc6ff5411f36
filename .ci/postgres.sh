#!/usr/bin/env bash
# Run a command next to a throw-away PostgreSQL server: .ci/postgres.sh <command> [args...]
#
#   .ci/postgres.sh make test
#   .ci/postgres.sh .venv/bin/python -m pytest -q tests/feedback
#
# What it does, in order:
#   1. installs Debian's `postgresql` package if no server binaries are found (needs root; apt-get);
#   2. creates a cluster in a fresh temp dir, owned by an unprivileged user (the `postgres` system user when run as
#      root, since the server refuses to run as root; otherwise the calling user), trust auth on 127.0.0.1 only;
#   3. starts it on a free port with its socket inside the temp dir (nothing shared with a system cluster), creates
#      the database `madfh`;
#   4. exports MADFH_TEST_POSTGRES_URL=postgresql+psycopg://madfh@127.0.0.1:<port>/madfh (a superuser role: the
#      tests create and drop a database per test) and runs the command;
#   5. on exit (normal, error or signal) stops the server and deletes the temp dir; exits with the command's status.
#
# A wrapper rather than a file to `source`: the cluster's lifetime is exactly the command's, and an EXIT trap in a
# sourced script would clash with the caller's own traps.
# Environment: PG_VERSION picks a server version when several are installed (default: the newest);
# MADFH_PG_KEEP=1 keeps the temp dir (logs) for debugging.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    sed -n '2,5p' "$0" >&2
    exit 2
fi

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local dir
    if [[ -n "${PG_VERSION:-}" ]]; then
        dir="/usr/lib/postgresql/${PG_VERSION}/bin"
        [[ -x "$dir/initdb" ]] && echo "$dir"
        return 0
    fi
    # Newest installed major version (Debian keeps server binaries out of PATH, under /usr/lib/postgresql/<v>/bin).
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5 -n -r); do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && { echo "$dir"; return 0; }
    done
    return 0
}

BINDIR="$(find_bindir)"
if [[ -z "$BINDIR" ]]; then
    if [[ $EUID -ne 0 ]]; then
        log "no PostgreSQL server found under /usr/lib/postgresql and not root: install Debian's postgresql package."
        exit 1
    fi
    log "installing Debian's postgresql package ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    BINDIR="$(find_bindir)"
    [[ -n "$BINDIR" ]] || { log "postgresql installed but no initdb found under /usr/lib/postgresql/*/bin"; exit 1; }
fi

if [[ $EUID -eq 0 ]]; then
    RUN_AS=postgres
    id -u "$RUN_AS" >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin "$RUN_AS"
    as_owner() { runuser -u "$RUN_AS" -- "$@"; }
else
    RUN_AS="$(id -un)"
    as_owner() { "$@"; }
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/madfh-pg.XXXXXX")"
chmod 700 "$WORK"
[[ $EUID -eq 0 ]] && chown "$RUN_AS" "$WORK"
DATA="$WORK/data"
LOGFILE="$WORK/server.log"
STARTED=0

# shellcheck disable=SC2317  # called from traps
cleanup() {
    local status=$?
    if [[ $STARTED -eq 1 ]]; then
        as_owner "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || log "could not stop the server cleanly"
    fi
    if [[ "${MADFH_PG_KEEP:-0}" == "1" ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
CHILD=""

as_owner "$BINDIR/initdb" -D "$DATA" -U madfh --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; exit 1; }

# A throw-away server: no fsync. The tests kill *clients* mid-write (the server then rolls their transactions back);
# surviving a crash of the server or the machine is PostgreSQL's own business and not what they test.
SPEED="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

for attempt in 1 2 3; do
    PORT="$(free_port)"
    if as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$LOGFILE" -w -t 60 \
        -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=100 $SPEED" start >/dev/null; then
        STARTED=1
        break
    fi
    log "start on port $PORT failed (attempt $attempt)"
    tail -n 20 "$LOGFILE" >&2 || true
done
[[ $STARTED -eq 1 ]] || { log "could not start PostgreSQL"; exit 1; }

as_owner "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U madfh madfh

export MADFH_TEST_POSTGRES_URL="postgresql+psycopg://madfh@127.0.0.1:${PORT}/madfh"
log "PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}') running as $RUN_AS: $MADFH_TEST_POSTGRES_URL"

# In the background with `wait`, so that a TERM/INT sent to this script is handled at once (bash runs traps only
# between foreground commands) and passed on to the command before the server is stopped.
# shellcheck disable=SC2317  # called from traps
forward() {
    [[ -n "$CHILD" ]] && kill "-$1" "$CHILD" 2>/dev/null && wait "$CHILD"
    exit "$2"
}
trap 'forward INT 130' INT
trap 'forward TERM 143' TERM
set +e
"$@" <&0 &
CHILD=$!
wait "$CHILD"
status=$?
set -e
exit "$status"
