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
echo "== 中文: a Chinese corpus indexed with the bundled Chinese toy model (toyworld-zh), queried by image and by a Chinese text"
$R build-index examples/toyworld-zh.tsv --model toyworld-zh --out indexes/toyworld-zh --overwrite
$R query examples/red_star.png --index indexes/toyworld-zh -k 3
$R query --text "左边有一个红色五角星" --index indexes/toyworld-zh -k 3
echo "== captions written by the bundled toy CoCa, then hybrid mode: retrieved and generated captions reranked"
echo "   (a generated caption that the index already holds is listed once, as retrieved)"
$R caption indexes/demo-images --generator toyworld-coca
$R query indexes/demo-images --mode hybrid --always-generate --generator toyworld-coca --index indexes/toyworld -k 3
echo "== your own data: fine-tune the toy CLIP on fresh toy images (filepath/title TSV), then index and query with it"
$R toy-images indexes/demo-train -n 256 --seed 7
$R finetune indexes/demo-train/captions.tsv --model toyworld --out indexes/demo-model --epochs 1 --batch-size 32 --overwrite
$R build-index examples/toyworld.tsv --model local-dir:indexes/demo-model --out indexes/toyworld-tuned --overwrite
$R query examples/red_star.png --index indexes/toyworld-tuned -k 3
echo "== a clip-interrogator-style prompt (the first run embeds ~112k labels into ~/.cache/retriever; the toy"
echo "   model knows shapes and colours, not art styles, so only the caption part is meaningful here)"
$R interrogate examples/red_star.png --model toyworld --caption-model toyworld-coca --mode fast
