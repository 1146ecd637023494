#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: Debian's `postgresql` package (installed if
# missing), a cluster in a temporary folder, listening on 127.0.0.1 only, trust
# authentication (nothing else can reach it), fsync off (nothing in it needs to survive).
#
#   source .ci/postgres.sh && postgres_start   # exports RESIDENCY_TEST_POSTGRES
#   postgres_stop                              # stops the cluster and removes its folder
#
# The tests that need PostgreSQL read RESIDENCY_TEST_POSTGRES (a connection URL to a
# database they may create other databases from) and skip, saying so, when it is unset.

postgres_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ]; then
        echo "postgres.sh: installing PostgreSQL (Debian package postgresql)" >&2
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        else
            sudo apt-get update -qq >&2
            sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        fi
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    echo "$bin"
}

# Runs a PostgreSQL program as the cluster's owner: initdb and postgres refuse to run as root.
postgres_as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

postgres_start() {
    local bin port try
    bin=$(postgres_bin)
    POSTGRES_DIR=$(mktemp -d /tmp/residency-pg.XXXXXX)
    chmod 755 "$POSTGRES_DIR"
    if [ "$(id -u)" = 0 ]; then
        chown postgres:postgres "$POSTGRES_DIR"
    fi
    postgres_as_owner "$bin/initdb" -D "$POSTGRES_DIR/data" -U postgres --auth=trust \
        -E UTF8 --locale=C.UTF-8 --no-sync >"$POSTGRES_DIR/initdb.log" 2>&1 \
        || { cat "$POSTGRES_DIR/initdb.log" >&2; return 1; }
    # A free port: try a few at random (another cluster or test may hold one).
    for try in 1 2 3 4 5 6 7 8; do
        port=$((20000 + RANDOM % 30000))
        if postgres_as_owner "$bin/pg_ctl" -D "$POSTGRES_DIR/data" -l "$POSTGRES_DIR/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $POSTGRES_DIR -c fsync=off -c max_connections=200" \
            start >/dev/null; then
            POSTGRES_BIN=$bin
            export RESIDENCY_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port/postgres"
            echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($POSTGRES_DIR)" >&2
            return 0
        fi
        tail -n 5 "$POSTGRES_DIR/server.log" >&2 || true
    done
    echo "postgres.sh: could not start PostgreSQL" >&2
    return 1
}

postgres_stop() {
    if [ -n "${POSTGRES_DIR:-}" ] && [ -d "$POSTGRES_DIR/data" ]; then
        postgres_as_owner "$POSTGRES_BIN/pg_ctl" -D "$POSTGRES_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$POSTGRES_DIR"
    fi
    unset RESIDENCY_TEST_POSTGRES POSTGRES_DIR
}
