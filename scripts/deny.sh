#!/usr/bin/env bash
# cargo deny (deny.toml): licenses, banned crates and sources, and RustSec's
# advisories. A machine that cannot fetch RustSec's database (no network)
# checks against the copy it fetched last, and says so when it has none.
# Every run also proves that an advisory fails the check: the same
# configuration against a database holding one made-up advisory on a crate
# of Cargo.lock must fail, naming it.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "deny: $*" >&2; }

if ! cargo deny --version >/dev/null 2>&1; then
    log "installing cargo-deny"
    cargo install --locked --quiet cargo-deny
fi

cargo deny --locked check licenses bans sources

# RustSec's advisories: fetched, or the last copy, or none at all.
out=$(mktemp)
scratch=$(mktemp -d)
trap 'rm -rf "$out" "$scratch"' EXIT
if cargo deny --locked check advisories >"$out" 2>&1; then
    log "advisories ok (RustSec's database fetched now)"
elif grep -q "failed to fetch advisory database" "$out"; then
    if cargo deny --locked --offline check advisories >"$out" 2>&1; then
        log "advisories ok, against the copy of RustSec's database fetched last (it cannot be fetched now)"
    elif grep -q "failed to get HEAD timestamp\|No such file or directory" "$out"; then
        log "WARNING: RustSec's advisory database cannot be fetched (no network) and was never fetched on this machine: advisories not checked here"
    else
        cat "$out" >&2
        exit 1
    fi
else
    cat "$out" >&2
    exit 1
fi

# The check fails on an advisory: one made up against itoa (in Cargo.lock).
grep -q '^name = "itoa"$' Cargo.lock || { log "itoa is no longer in Cargo.lock: pick another crate for the made-up advisory"; exit 1; }
mkdir -p "$scratch/dbs"
sed "s|^\[advisories\]$|[advisories]\ndb-path = \"$scratch/dbs\"|" deny.toml >"$scratch/deny.toml"
# cargo-deny names the database's directory after its URL: ask it which.
cargo deny --locked --offline --config "$scratch/deny.toml" check advisories >"$out" 2>&1 || true
db=$(grep -o "$scratch/dbs/advisory-db-[0-9a-f]*" "$out" | head -n1)
[ -n "$db" ] || { cat "$out" >&2; log "cannot tell where cargo-deny looks for its database"; exit 1; }
mkdir -p "$db/crates/itoa"
cat >"$db/crates/itoa/RUSTSEC-2099-0001.md" <<'ADVISORY'
```toml
[advisory]
id = "RUSTSEC-2099-0001"
package = "itoa"
date = "2026-12-01"
url = "https://rustsec.org/advisories/RUSTSEC-2099-0001"
categories = ["memory-corruption"]

[versions]
patched = []
```

# A made-up advisory

Every version is affected: the check must fail on it.
ADVISORY
git -C "$db" init -q -b main
git -C "$db" add -A
git -C "$db" -c user.name=orderflow -c user.email=deny@orderflow.invalid commit -qm "made-up advisory"
if cargo deny --locked --offline --config "$scratch/deny.toml" check advisories >"$out" 2>&1; then
    log "a made-up advisory against itoa did not fail the check: deny.toml lets advisories through"
    exit 1
fi
grep -q "RUSTSEC-2099-0001" "$out" || { cat "$out" >&2; log "the check failed, but not on the made-up advisory"; exit 1; }
log "a made-up advisory fails the check, as a real one would"
