#!/usr/bin/env bash
# Make sure the browser tests (tests/browser/) have a Chromium: Debian's `chromium` package, driven
# by the Python `playwright` package of .venv-comfyui (tools/setup_comfyui_env.sh installs it).
# Never downloads a browser build (no `playwright install`). Installs with apt-get only where it can
# (root, or sudo without a password); otherwise it says why and exits 0: the browser test then
# skips with that reason and every other test still runs.
#
#   bash tools/setup_browser.sh                     # check / install
#   DREAMBOOTH_NO_BROWSER_INSTALL=1 bash tools/...  # check only
set -uo pipefail

found() {
    if [ -n "${CHROMIUM:-}" ]; then [ -x "$CHROMIUM" ] && echo "$CHROMIUM"; return; fi
    command -v chromium || command -v chromium-browser
}

if path="$(found)" && [ -n "$path" ]; then
    echo "chromium: $path ($("$path" --version 2>/dev/null | head -1))"
    exit 0
fi

why=""
if [ -n "${DREAMBOOTH_NO_BROWSER_INSTALL:-}" ]; then
    why="DREAMBOOTH_NO_BROWSER_INSTALL is set"
elif ! command -v apt-get >/dev/null 2>&1; then
    why="no apt-get on this system; install Chromium with the system's package manager (or set CHROMIUM=/path)"
else
    if [ "$(id -u)" = 0 ]; then
        run=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        run=(sudo -n)
    else
        why="not root and no password-less sudo: run \`sudo apt-get install chromium\`"
    fi
    if [ -z "$why" ]; then
        echo "installing Debian's chromium with apt-get ..."
        export DEBIAN_FRONTEND=noninteractive
        if ! { "${run[@]}" apt-get update -qq && "${run[@]}" apt-get install -y -qq --no-install-recommends chromium; }; then
            why="apt-get could not install chromium (no network or no such package?)"
        fi
    fi
fi

if path="$(found)" && [ -n "$path" ]; then
    echo "chromium: $path"
    exit 0
fi
echo "no Chromium: ${why:-chromium is still not on PATH after installing}; the browser tests will be skipped" >&2
exit 0
