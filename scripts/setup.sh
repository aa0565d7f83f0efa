#!/usr/bin/env bash
# Install everything wasnap's build, guests and tests need on a fresh Debian machine with
# rustup, Python 3 and Node.js: the wasm32-wasip1 Rust target, the Debian toolchains the
# C and WAT guests are built with, and the pinned AssemblyScript compiler from npm; for
# the component guests, the wasm32-wasip2 target, componentize-py (PyPI) and
# componentize-js (npm), all pinned.
# (The test S3 server's Python environment is made by scripts/s3-server.sh on first use.)
# Idempotent, and quick when everything is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "setup: adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi
# The Rust component guest: rustc links wasm32-wasip2 output into a component itself.
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 Rust target"
  rustup target add wasm32-wasip2
fi

# Debian: wabt (wat2wasm) for WAT guests; clang, lld, wasi-libc and the wasm32 compiler
# runtime (the linker needs its builtins) for C guests; binaryen (wasm-opt) for stdio
# mode's asyncify transform; cmake to build librdkafka (the Kafka client, vendored by
# the rdkafka crate: Debian's is too old; its configuration code includes curl's header).
packages=(wabt clang lld wasi-libc libclang-rt-14-dev-wasm32 binaryen cmake libcurl4-openssl-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# npm: the AssemblyScript compiler, at the version package-lock.json pins.
as="$root/guests/assemblyscript"
if ! cmp -s "$as/package-lock.json" "$as/node_modules/.wasnap-installed" 2>/dev/null; then
  echo "setup: installing the AssemblyScript compiler (npm ci)"
  (cd "$as" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$as/package-lock.json" "$as/node_modules/.wasnap-installed"
fi

# The Python component guest: componentize-py, pinned, in a virtualenv of its own under
# target/ (ignored by git; scripts/build-guests.sh runs it from there).
cpy_version=0.25.1
cpy="$root/target/tools/componentize-py-venv"
if [ "$("$cpy/bin/componentize-py" --version 2>/dev/null)" != "componentize-py $cpy_version" ]; then
  echo "setup: installing componentize-py $cpy_version (pip, in target/tools)"
  rm -rf "$cpy"
  python3 -m venv "$cpy"
  "$cpy/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$cpy_version"
fi

# The JavaScript component guest: componentize-js, at the version package-lock.json pins.
cjs="$root/guests/components/js"
if ! cmp -s "$cjs/package-lock.json" "$cjs/node_modules/.wasnap-installed" 2>/dev/null; then
  echo "setup: installing componentize-js (npm ci)"
  (cd "$cjs" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$cjs/package-lock.json" "$cjs/node_modules/.wasnap-installed"
fi
