#!/usr/bin/env bash
# Fetches the human-rated sentiment data of Hutto & Gilbert (ICWSM 2014, MIT): the file
# additional_resources/hutto_ICWSM_2014.tar.gz inside the source distribution of the Python
# package vaderSentiment==3.3.2 (10,605 movie-review snippets, each with the mean rating of 20
# raters on -4..+4, plus Amazon, tweet and NYT sets). Puts the ground-truth files in
# data/sentiment/ (git-ignored) and checks both archives' sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=data/sentiment
SDIST_SHA=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
TAR_SHA=d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa
if [ -f "$OUT/.sha256" ] && [ "$(cat "$OUT/.sha256")" = "$TAR_SHA" ]; then
  echo "data ready: $OUT"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" vaderSentiment==3.3.2
echo "$SDIST_SHA  $tmp/vaderSentiment-3.3.2.tar.gz" | sha256sum -c --status \
  || { echo "sha256 mismatch for vaderSentiment-3.3.2.tar.gz" >&2; exit 1; }
tar xzf "$tmp/vaderSentiment-3.3.2.tar.gz" -C "$tmp" vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz
inner="$tmp/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
echo "$TAR_SHA  $inner" | sha256sum -c --status || { echo "sha256 mismatch for hutto_ICWSM_2014.tar.gz" >&2; exit 1; }
tar xzf "$inner" -C "$tmp"
mkdir -p "$OUT.part"
cp "$tmp"/hutto_ICWSM_2014/*_GroundTruth.txt "$tmp"/hutto_ICWSM_2014/_README_.txt "$OUT.part/"
echo "$TAR_SHA" > "$OUT.part/.sha256"
rm -rf "$OUT" && mv "$OUT.part" "$OUT"
echo "data ready: $OUT ($(wc -l < "$OUT/movieReviewSnippets_GroundTruth.txt") movie snippets)"
