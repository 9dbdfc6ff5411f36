#!/usr/bin/env bash
# Install what the review app's browser test needs, if missing: Debian's chromium and chromium-driver (a matching
# pair from the same archive; no browser download by a test tool, which cannot reach its servers here).
#
#   .ci/browser.sh            # then: .venv/bin/python -m pytest -q tests/app/test_browser.py
#
# Needs root (apt-get) when something is missing; prints the versions it found. The test finds them at
# /usr/bin/chromium and /usr/bin/chromedriver (override with MADFH_CHROMIUM / MADFH_CHROMEDRIVER).
set -euo pipefail

log() { echo "browser.sh: $*" >&2; }

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    log "found $(/usr/bin/chromium --version 2>/dev/null | head -n1) and $(/usr/bin/chromedriver --version | head -n1)"
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    log "chromium and chromium-driver are missing and this is not root: apt-get install chromium chromium-driver"
    exit 1
fi
log "installing Debian's chromium and chromium-driver ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
[[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] || { log "installed, but /usr/bin/chromium(driver) is missing"; exit 1; }
log "installed $(/usr/bin/chromium --version 2>/dev/null | head -n1) and $(/usr/bin/chromedriver --version | head -n1)"
