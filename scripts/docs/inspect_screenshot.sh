#!/usr/bin/env bash
# Remake docs/images/inspect.png: the page `bigmodel inspect` writes, rendered by headless Chromium.
#
#   scripts/docs/inspect_screenshot.sh [WORK_DIR]
#
# Trains the quickstart's tiny model (300 steps, a few minutes on 2 CPU cores) into WORK_DIR/qs unless it is
# already there, inspects it on a prompt from its corpus, and screenshots WORK_DIR/inspect/index.html.
# Needs chromium (Debian: apt-get install -y chromium). BIGMODEL overrides the command, e.g.
# BIGMODEL="python -m bigmodel_cli" from a checkout.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d)}
read -r -a bigmodel <<<"${BIGMODEL:-bigmodel}"
prompt="the red fox sees the owl in the garden."

if [ ! -d "$work/qs/run" ]; then
    "${bigmodel[@]}" quickstart --out "$work/qs" --steps 300
fi
rm -rf "$work/inspect"
"${bigmodel[@]}" inspect "$work/qs/run" --prompt "$prompt" --out "$work/inspect"

profile=$(mktemp -d)  # a throwaway profile: nothing of the user's browser is read or written
trap 'rm -rf "$profile"' EXIT
mkdir -p "$repo/docs/images"
# Everything that would reach the network is off: the page itself loads nothing.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$repo/docs/images/inspect.png" --window-size=1200,900 "file://$work/inspect/index.html#layer=1&head=2"
echo "wrote $repo/docs/images/inspect.png"
