#!/usr/bin/env bash
# The wheel is the product: build the sdist and a wheel from it, install the wheel into a fresh
# venv outside the checkout, and from there import every module and run the offline demo's
# commands (toy build, query, caption, serve start-up and requests). Catches package data
# left out of the wheel and imports that only work from the source tree.
#
# The fresh venv reuses .venv's third-party packages (torch alone is ~1 GB) through a .pth file
# pointing at a copy of .venv's site-packages listing without this project, so pip resolves the
# wheel's dependencies against them offline (--no-index): a dependency the wheel declares but
# .venv lacks still fails the install. Needs scripts/setup.sh first. Usage: bash scripts/check_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}  # the setup.sh venv; PY=... to use another with the same packages
MAX_WHEEL_MB=${MAX_WHEEL_MB:-45}   # the three bundled toy models are ~33 MB; anything else heavy is a mistake
WORK=$(mktemp -d "${TMPDIR:-/tmp}/retriever-wheel.XXXXXX")
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
START=$SECONDS
step() { echo "check_wheel [$((SECONDS - START)) s]: $*" >&2; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$PY" ] || fail "no $PY: run bash scripts/setup.sh first"

step "building sdist and wheel (the wheel from the sdist)"
"$PY" -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; fail "python -m build"; }
WHEEL=$(ls "$WORK"/dist/*.whl)
SDIST=$(ls "$WORK"/dist/*.tar.gz)
"$PY" - "$WHEEL" "$SDIST" "$MAX_WHEEL_MB" <<'EOF' || fail "wheel contents"
import sys, tarfile, zipfile
wheel, sdist, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
import os
names = zipfile.ZipFile(wheel).infolist()
tops = {i.filename.split("/")[0] for i in names}
assert all(t == "retriever" or t.endswith(".dist-info") for t in tops), f"unexpected top-level entries: {sorted(tops)}"
files = {i.filename for i in names}
for needed in ("retriever/py.typed", "retriever/serve/web/index.html", "retriever/models/weights/toyworld/open_clip_config.json"):
    assert needed in files, f"{needed} is not in the wheel"
assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files), "LICENSE is not in the wheel"
for model in ("toyworld", "toyworld-coca", "toyworld-style"):
    assert any(f.startswith(f"retriever/models/weights/{model}/") and f.endswith(".safetensors") for f in files), model
size = os.path.getsize(wheel) / 2**20
largest = sorted(names, key=lambda i: -i.file_size)[:4]
print(f"wheel {os.path.basename(wheel)}: {size:.1f} MB ({len(names)} files; largest: "
      + ", ".join(f"{i.filename.split('/', 3)[-1]} {i.file_size / 2**20:.1f} MB" for i in largest) + ")", file=sys.stderr)
print(f"sdist {os.path.basename(sdist)}: {os.path.getsize(sdist) / 2**20:.1f} MB", file=sys.stderr)
assert size <= limit, f"the wheel is {size:.1f} MB, over {limit:g} MB: something heavy was packaged"
members = tarfile.open(sdist).getnames()
assert any(m.endswith("/README.md") for m in members) and any(m.endswith("/pyproject.toml") for m in members)
EOF

step "a fresh venv outside the checkout, with .venv's third-party packages"
"$PY" -m venv "$WORK/venv"
# The venv's own setuptools (older, from ensurepip) would shadow the one torch requires.
"$WORK/venv/bin/python" -m pip uninstall -q -y setuptools >/dev/null 2>&1 || true
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PARENT=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir "$WORK/deps"
for entry in "$PARENT"/*; do
  case "$(basename "$entry")" in
    retriever|retriever-*|retriever.*|caption_retriever*|__editable__*|*.pth|pip|pip-*) ;;  # this project, editable hooks, pip
    *) ln -s "$entry" "$WORK/deps/" ;;
  esac
done
echo "$WORK/deps" > "$SITE/_parent_packages.pth"
"$WORK/venv/bin/python" -m pip install -q --no-index --find-links "$WORK/dist" "caption-retriever[cpu,serve]" \
  >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; fail "pip install the wheel"; }

cd "$WORK"  # nothing from the checkout on sys.path from here on
V=$WORK/venv/bin
R=$V/retriever
cp "$ROOT/examples/toyworld.tsv" "$ROOT/examples/red_star.png" "$WORK/"

step "importing every module from the installed wheel"
"$V/python" - "$SITE" <<'EOF' || fail "imports"
import importlib, pkgutil, sys
import retriever
site = sys.argv[1]
assert retriever.__file__.startswith(site), f"retriever imported from {retriever.__file__}, not the installed wheel"
modules = [m.name for m in pkgutil.walk_packages(retriever.__path__, "retriever.")]
skip = {"retriever.__main__"}  # runs the CLI when imported
for name in modules:
    if name not in skip:
        importlib.import_module(name)
print(f"imported {len(modules) - len(skip)} modules", file=sys.stderr)
EOF

step "retriever --version"
"$R" --version | tee "$WORK/version.txt" >&2
grep -q "^index formats " "$WORK/version.txt" || fail "--version has no index formats line"

step "toy build, query, caption"
"$R" build-index toyworld.tsv --model toyworld --out indexes/toyworld --quiet
"$R" query red_star.png --index indexes/toyworld -k 3 --json > hits.jsonl
"$V/python" -c "import json; h = json.loads(open('hits.jsonl').readline()); assert h['text'] == 'a large red star on the left', h" \
  || fail "query did not find the red star"
"$R" toy-images images -n 2 --seed 42 >/dev/null
"$R" caption images --generator toyworld-coca --json > captions.jsonl
[ "$(wc -l < captions.jsonl)" -ge 2 ] || fail "caption wrote $(wc -l < captions.jsonl) lines for 2 images"

step "serve: start-up and requests"
PORT=$("$V/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$R" serve --index indexes/toyworld --generator toyworld-coca --port "$PORT" >serve.log 2>&1 &
SERVER_PID=$!
"$V/python" - "$PORT" <<'EOF' || { cat serve.log >&2; fail "serve"; }
import base64, json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + 120
while True:
    try:
        assert json.load(urllib.request.urlopen(url + "/healthz", timeout=2))["status"] == "ok"
        break
    except OSError:
        if time.time() > deadline:
            raise SystemExit("the server did not answer /healthz within 120 s")
        time.sleep(0.5)
page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
assert "<html" in page.lower(), "the web page is missing"
image = base64.b64encode(open("red_star.png", "rb").read()).decode()
request = urllib.request.Request(url + "/v1/query", data=json.dumps({"image_base64": image, "k": 3}).encode(),
                                 headers={"content-type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=60))
assert answer["hits"][0]["text"] == "a large red star on the left", answer
print(f"served {len(answer['hits'])} hits for red_star.png", file=sys.stderr)
EOF
step "OK"
