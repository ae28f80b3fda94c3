#!/usr/bin/env bash
# Installs Debian's chromium for the browser test when possible (root + apt); otherwise says why and carries on,
# and the browser test skips itself.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: not root or no apt-get; the browser test will be skipped" >&2
  exit 0
fi
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
  || echo "install_browser: apt-get install chromium failed; the browser test will be skipped" >&2
exit 0
