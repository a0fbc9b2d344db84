#!/usr/bin/env bash
# Builds a fully static rollbox for Modal sandboxes (any Linux image), caches it by the source it
# was built from, and prints its path:
#
#   rollbox rollout ... --provision modal --server-binary "$(scripts/build-static-rollbox.sh)"
#
# Static glibc (`-C target-feature=+crt-static` on x86_64-unknown-linux-gnu), not musl: the
# musl target's standard library is not installed here and cannot be fetched (it does not come
# from a package registry). `--target` is explicit so that build scripts and proc-macros are
# still built for the host, dynamically, as they must be. A release build takes 15+ minutes on
# two cores; the cache makes a second call instant.
#
# The cache key is a hash of every tracked file the binary is built from (with uncommitted
# changes), so an edit makes a new build. The cache is $ROLLBOX_CACHE_DIR/static-rollbox
# (default ~/.cache/rollbox/static-rollbox).
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
cache="${ROLLBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rollbox}/static-rollbox"
key=$( { git ls-files -s -- Cargo.toml Cargo.lock src build.rs 2>/dev/null; git diff HEAD -- Cargo.toml Cargo.lock src; } \
    | sha256sum | cut -c1-16)
binary="$cache/rollbox-$key"
if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi

echo "building a static rollbox (release, $target, crt-static); this takes a while" >&2
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" --bin rollbox >&2
built="target/$target/release/rollbox"

# A static executable has no program interpreter (PT_INTERP, the dynamic loader's path).
if readelf --program-headers --wide "$built" | grep -q 'INTERP'; then
    echo "error: $built asks for a dynamic loader: it is not static" >&2
    exit 1
fi
mkdir -p "$cache"
# The release profile keeps line tables (207 MB here); the image gets the stripped copy (37 MB).
strip -o "$binary.partial" "$built"
mv "$binary.partial" "$binary"
echo "$binary"
