#!/bin/sh
# The first platform admin, from ADMIN_EMAIL, ADMIN_NAME and ADMIN_PASSWORD (a Secret), on the
# database of AIMASS_DATABASE. A gateway that listens beyond loopback refuses to start while no
# user or API key exists; this makes one. Run it again and it changes nothing: an existing
# account with that email is left as it is.
set -eu
: "${ADMIN_EMAIL:?set ADMIN_EMAIL}" "${ADMIN_PASSWORD:?set ADMIN_PASSWORD}"
aimass db upgrade
if aimass users list --json | ADMIN_EMAIL="$ADMIN_EMAIL" python -c '
import json, os, sys
emails = {u["email"].lower() for u in json.load(sys.stdin)}
sys.exit(0 if os.environ["ADMIN_EMAIL"].lower() in emails else 1)
'; then
    echo "admin $ADMIN_EMAIL exists already"
else
    printf '%s\n' "$ADMIN_PASSWORD" |
        aimass users create --admin --email "$ADMIN_EMAIL" --name "${ADMIN_NAME:-Admin}" --password-stdin
fi
