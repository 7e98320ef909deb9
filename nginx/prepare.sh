#!/usr/bin/env bash
# Prepares everything the nginx module build needs, idempotently:
#   - Debian's nginx, nginx-dev (headers + configure) and libclang-dev (bindgen), if missing;
#   - a copy of /usr/share/nginx/src configured with Debian's own flags plus -fPIC, so the
#     module's signature matches the stock /usr/sbin/nginx and `load_module` accepts it.
# Prints the NGINX_BUILD_DIR to build the module with (its last line of output).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$here/.build"
src="$build/nginx-src"

missing=()
for p in nginx nginx-dev libclang-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "prepare: installing ${missing[*]}" >&2
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
    # The Debian package starts a system nginx on port 80; the tests run their own.
    if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
        "${sudo_cmd[@]}" systemctl stop nginx >&2 || true
    fi
fi

# The marker records which nginx the copy was configured for, so an upgrade reconfigures.
version="$(dpkg-query -W -f='${Version}' nginx-dev)"
marker="$build/configured-$version"
if [ ! -f "$marker" ] || [ ! -f "$src/objs/ngx_auto_config.h" ]; then
    echo "prepare: configuring nginx $version source copy in $src" >&2
    rm -rf "$src" "$build"/configured-*
    mkdir -p "$build"
    cp -a /usr/share/nginx/src "$src"
    (
        cd "$src"
        # conf_flags defines NGX_CONF_FLAGS (Debian's configure arguments, --with-compat among them).
        # shellcheck disable=SC1091
        . ./conf_flags
        cc_opt="$(dpkg-buildflags --get CFLAGS) $(dpkg-buildflags --get CPPFLAGS) -fPIC"
        ld_opt="$(dpkg-buildflags --get LDFLAGS) -fPIC"
        ./configure --with-cc-opt="$cc_opt" --with-ld-opt="$ld_opt" "${NGX_CONF_FLAGS[@]}" >&2
    )
    touch "$marker"
fi
echo "$src/objs"
