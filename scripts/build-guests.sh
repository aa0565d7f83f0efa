#!/usr/bin/env bash
# Build every example guest from source into target/guests/*.wasm.
# Called by the tests (once per test binary) and by the demo; incremental and quick when
# nothing changed. Run scripts/setup.sh first on a fresh machine.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/guests"
mkdir -p "$out"

# Several test binaries may call this at once: one build at a time.
exec 9>"$out/.lock"
flock 9

# Rust guests (cdylib reactors for wasm32-wasip1).
cargo build --quiet --release --target wasm32-wasip1 \
  --manifest-path "$root/guests/rust/Cargo.toml" --target-dir "$root/target/guests/rust"
for g in wordcount window counter bigstate stdio-wordfreq; do
  install -m 0644 "$root/target/guests/rust/wasm32-wasip1/release/$g.wasm" "$out/$g.wasm.tmp"
  mv "$out/$g.wasm.tmp" "$out/$g.wasm"
done

# C guests (WASI reactors: `_initialize` runs libc's constructors on a fresh start).
for src in "$root"/guests/c/*.c; do
  name="c-$(basename "$src" .c)"
  clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor -o "$out/$name.wasm.tmp" "$src"
  mv "$out/$name.wasm.tmp" "$out/$name.wasm"
done

# Stdio programs in C: ordinary WASI commands (`main`), no wasnap ABI.
for src in "$root"/guests/stdio/*.c; do
  name="stdio-c-$(basename "$src" .c)"
  clang --target=wasm32-wasi --sysroot=/usr -O2 -o "$out/$name.wasm.tmp" "$src"
  mv "$out/$name.wasm.tmp" "$out/$name.wasm"
done

# AssemblyScript guests (compiler pinned in package-lock.json, installed by setup.sh).
(cd "$root/guests/assemblyscript" && npm run --silent build >/dev/null)
for g in inventory wordcount; do
  install -m 0644 "$root/guests/assemblyscript/build/$g.wasm" "$out/as-$g.wasm.tmp"
  mv "$out/as-$g.wasm.tmp" "$out/as-$g.wasm"
done

# WAT guests.
for src in "$root"/guests/wat/*.wat; do
  name="wat-$(basename "$src" .wat)"
  wat2wasm "$src" -o "$out/$name.wasm.tmp"
  mv "$out/$name.wasm.tmp" "$out/$name.wasm"
done
