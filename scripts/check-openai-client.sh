#!/usr/bin/env bash
# The official `openai` Python client against `meet serve` (README "Serving"): a venv with the
# pinned client, a model with controls (a short MEET-LoRA run on SmolLM2 unless a folder is
# given), the server with an API key, then scripts/check_openai_client.py.
#   scripts/check-openai-client.sh [MODEL_FOLDER [CONTROL]]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEET_OPENAI_VENV:-$HOME/.cache/meet-openai-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet openai==2.8.1
fi
meet=./target/release/meet
[ -x "$meet" ] || cargo build --release
model="${1:-}"
control="${2:-good}"
if [ -z "$model" ]; then
  ./scripts/fetch-model.sh
  run=$(mktemp -d)
  "$meet" train examples/meet-lora.toml --output-dir "$run" --max-steps 4 >/dev/null 2>&1
  model="$run/final"
fi
log=$(mktemp)
MEET_API_KEY=sk-local "$meet" serve --model "$model" --served-model-name meet --addr 127.0.0.1:0 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "on http://" "$log" && break; sleep 0.2; done
url=$(grep -o "http://[0-9.:]*/v1" "$log")
echo "meet serve --model $model at $url"
"$venv/bin/python" -c "import openai; print('openai', openai.__version__)"
"$venv/bin/python" scripts/check_openai_client.py "$url" sk-local "$control"
