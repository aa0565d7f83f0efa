#!/usr/bin/env bash
# Install everything wasnap's build, guests and tests need on a fresh Debian machine with
# rustup: the wasm32-wasip1 target and the Debian tools the guests are built with.
# Idempotent and quick when everything is already there.
set -euo pipefail

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "setup: adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi

# Debian packages, by the command (or file) that shows each is installed.
missing=()
command -v wat2wasm >/dev/null || missing+=(wabt)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
