#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs every check.
#
#   tests/run.sh [pytest args...]
#
# On a fresh Debian 12 machine (as root, or with password-less sudo) it installs the Debian
# packages for the real test servers (Dovecot, Postfix, NSD, PostgreSQL, swaks, isync) without
# letting their default system instances start, creates .venv with `python3 -m venv`, installs
# the project with its test extras, and runs ruff (lint and format), mypy and pytest. Extra
# arguments go to pytest. It exits non-zero if any check fails (all checks still run).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(python3 python3-venv python3-dev gcc ca-certificates
          dovecot-imapd dovecot-lmtpd postfix nsd postgresql swaks isync
          libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl)  # swaks needs these for TLS and AUTH
# The system service each server package brings (stopped and disabled after installing it).
declare -A SERVICE_OF=([postfix]=postfix [dovecot-imapd]=dovecot [nsd]=nsd [postgresql]=postgresql)

say() { printf '==> %s\n' "$*" >&2; }

# -- Debian packages --------------------------------------------------------------------------------

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo)
    else
        say "missing Debian packages: ${missing[*]}"
        say "run this script as root (or with password-less sudo) to install them"
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix would otherwise ask how to configure the system's own mail server.
    echo "postfix postfix/main_mailer_type select No configuration" \
        | "${SUDO[@]}" debconf-set-selections
    # Keep the packages' own services from starting: the tests run private instances on free
    # ports, and the system ones would only hold ports 25, 53, 143 and 5432.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
        policy_added=1
        trap '"${SUDO[@]}" rm -f "$policy"' EXIT
    fi
    if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
        "${SUDO[@]}" apt-get update -q
    fi
    if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        # Stale package lists: refresh once and retry.
        "${SUDO[@]}" apt-get update -q
        "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    if [[ -n ${policy_added:-} ]]; then
        "${SUDO[@]}" rm -f "$policy"
        trap - EXIT
    fi
    # Should anything have started them anyway (or at the next boot), stop and disable the
    # services of what was just installed (never a system instance that was already there).
    for pkg in "${missing[@]}"; do
        service=${SERVICE_OF[$pkg]:-}
        [[ -n $service ]] || continue
        if [[ -d /run/systemd/system ]]; then
            "${SUDO[@]}" systemctl disable --now "$service" >/dev/null 2>&1 || true
        else
            "${SUDO[@]}" service "$service" stop >/dev/null 2>&1 || true
            "${SUDO[@]}" update-rc.d "$service" disable >/dev/null 2>&1 || true
        fi
    done
fi

# -- Python environment -----------------------------------------------------------------------------

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    say "python3 is $(python3 --version 2>&1); Mailgate needs 3.11 or newer"
    exit 1
fi
if ! .venv/bin/python -c 'import sys' 2>/dev/null; then
    say "creating .venv"
    python3 -m venv --clear .venv
fi
# Reinstall only when the dependency list changed (or after a failed install).
stamp=.venv/.mailgate-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    say "installing the project and its test dependencies into .venv"
    rm -f "$stamp"
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$want" >"$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

# -- Checks -----------------------------------------------------------------------------------------

status=0
check() {
    say "$*"
    if ! "$@"; then
        say "FAILED: $*"
        status=1
    fi
}
check ruff check .
check ruff format --check .
check mypy
check pytest "$@"
if ((status)); then
    say "some checks failed"
else
    say "all checks passed"
fi
exit "$status"
