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

# Component guests: the FunctionStream `processor` world (wit/processor.wit) in Rust,
# Python and JavaScript, one logic (guests/components/README.md). The Python and JS
# builds take seconds each and this script runs once per test binary, so each output is
# rebuilt only when a file it is made from is newer than it.
stale() { # OUT PATH...: OUT is missing, or a file under a PATH is newer than it.
  [ -e "$1" ] || return 0
  local o=$1; shift
  # Builds leave __pycache__/ and node_modules/ in the source folders: not inputs.
  [ -n "$(find "$@" \( -name __pycache__ -o -name node_modules \) -prune \
    -o -type f -newer "$o" -print -quit)" ]
}
wit="$root/wit/processor.wit"
comp="$root/guests/components"

# Rust: wasm32-wasip2, where rustc links a component directly.
if stale "$out/component-rust.wasm" "$wit" "$comp/rust"; then
  cargo build --quiet --release --target wasm32-wasip2 \
    --manifest-path "$comp/rust/Cargo.toml" --target-dir "$out/component-rust-target"
  install -m 0644 "$out/component-rust-target/wasm32-wasip2/release/component_rust.wasm" \
    "$out/component-rust.wasm.tmp"
  mv "$out/component-rust.wasm.tmp" "$out/component-rust.wasm"
fi

# Python: componentize-py (pinned, in the virtualenv setup.sh makes). --stub-wasi makes
# every WASI function trap, stderr included, hence its own entry module without stderr.
cpy="$root/target/tools/componentize-py-venv/bin/componentize-py"
for v in "component-python app" "component-python-stubwasi app_stubwasi --stub-wasi"; do
  read -r name module flags <<<"$v"
  if stale "$out/$name.wasm" "$wit" "$comp/python" "$cpy"; then
    "$cpy" -d "$wit" -w processor componentize $flags -p "$comp/python" "$module" \
      -o "$out/$name.wasm.tmp" >/dev/null
    mv "$out/$name.wasm.tmp" "$out/$name.wasm"
  fi
done

# JavaScript: componentize-js (pinned in package-lock.json, installed by setup.sh; its
# marker file is newer after a reinstall).
js="$comp/js"
if stale "$out/component-js.wasm" "$wit" "$js/processor.js" "$js/build.mjs" \
  "$js/package-lock.json" "$js/node_modules/.wasnap-installed"; then
  node "$js/build.mjs" "$out/component-js.wasm.tmp"
  mv "$out/component-js.wasm.tmp" "$out/component-js.wasm"
fi
