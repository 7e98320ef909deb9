#!/bin/bash
# Init container `render-config`: writes the Envoy config the pod runs, with the purge token
# from the Secret in place of the placeholder. The result lives in a memory-backed emptyDir
# that only this pod mounts; the ConfigMap itself never holds the token.
# Pure bash (no sed/awk): the token never appears on a command line.
set -euo pipefail
src="${CONFIG_DIR:-/etc/edge-filter}/envoy.yaml"
token_file="${SECRET_DIR:-/var/run/secrets/edge-filter}/token"
out="${OUT_DIR:-/run/envoy}/envoy.yaml"
placeholder=__EDGE_FILTER_PURGE_TOKEN__

token="$(<"${token_file}")"
token="${token%$'\n'}"
# A charset that needs no escaping in JSON, YAML or a bash replacement (no & or \).
if [[ ! "${token}" =~ ^[A-Za-z0-9._~-]{32,256}$ ]]; then
  echo "render-config: ${token_file} must hold 32 to 256 characters of [A-Za-z0-9._~-]" >&2
  exit 1
fi
config="$(<"${src}")"
if [[ "${config}" != *"${placeholder}"* ]]; then
  echo "render-config: ${src} has no ${placeholder}" >&2
  exit 1
fi
umask 077
printf '%s\n' "${config//"${placeholder}"/${token}}" >"${out}"
echo "render-config: wrote ${out}"
