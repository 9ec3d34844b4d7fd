#!/usr/bin/env bash
# The offline demo: index a small corpus with the bundled toyworld model, then query with images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
R=.venv/bin/retriever
$R build-index examples/toyworld.tsv --model toyworld --out indexes/toyworld --overwrite
echo "== a shipped image: examples/red_star.png (a large red star on the left)"
$R query examples/red_star.png --index indexes/toyworld -k 5
echo "== freshly generated images (their true captions are in the file names)"
$R toy-images indexes/demo-images -n 3 --seed 42
$R query indexes/demo-images --index indexes/toyworld -k 3
echo "== captions written by the bundled toy CoCa, then hybrid mode: retrieved and generated captions reranked"
echo "   (a generated caption that the index already holds is listed once, as retrieved)"
$R caption indexes/demo-images --generator toyworld-coca
$R query indexes/demo-images --mode hybrid --always-generate --generator toyworld-coca --index indexes/toyworld -k 3
