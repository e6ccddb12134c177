#!/bin/sh
# Initialise the data directory on the first start (a superuser
# POSTGRES_USER with POSTGRES_PASSWORD, a database POSTGRES_DB, password
# logins from anywhere), then run the server in the foreground.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
data=/var/lib/postgresql/data
chown postgres "$data"
if [ ! -s "$data/PG_VERSION" ]; then
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
    chown postgres /tmp/pwfile
    su postgres -c "$bin/initdb -D $data -U $POSTGRES_USER --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256"
    rm -f /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
    su postgres -c "$bin/pg_ctl -D $data -o \"-c listen_addresses=''\" -w start"
    su postgres -c "$bin/createdb -U $POSTGRES_USER $POSTGRES_DB"
    su postgres -c "$bin/pg_ctl -D $data -m fast -w stop"
fi
exec su postgres -c "exec $bin/postgres -D $data -c listen_addresses='*'"
