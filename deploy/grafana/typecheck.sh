#!/usr/bin/env bash
# Type-check every dashboard in deploy/grafana/dashboards/ (or $SLIDR_DASHBOARDS_DIR) against Grafana's published types: npm's
# @grafana/schema (the version of the compose stack's Grafana) and the TypeScript compiler, `tsc --strict`.
# Each dashboard becomes an object literal `satisfies Dashboard`, so a misspelt or mistyped field fails (excess
# property checks). The npm packages (deploy/grafana/package.json) go into .cache/grafana-ts, once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$ROOT/.cache/grafana-ts"
say() { echo "[grafana] $*" >&2; }
command -v npm >/dev/null || { say "npm (Node.js) is required"; exit 1; }
mkdir -p "$WORK"
stamp="$WORK/.installed-$(sha256sum "$ROOT/deploy/grafana/package.json" | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  say "installing @grafana/schema and typescript into $WORK"
  cp "$ROOT/deploy/grafana/package.json" "$WORK/package.json"
  (cd "$WORK" && npm install --no-audit --no-fund --loglevel=error >&2)
  rm -f "$WORK"/.installed-* && touch "$stamp"
fi
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
n=0
for f in "${SLIDR_DASHBOARDS_DIR:-$ROOT/deploy/grafana/dashboards}"/*.json; do
  name="$(basename "$f" .json | tr -c 'A-Za-z0-9\n' '_')"
  { echo 'import type { Dashboard } from "@grafana/schema";'
    printf 'export const %s = %s satisfies Dashboard;\n' "$name" "$(cat "$f")"; } > "$WORK/src/$name.ts"
  n=$((n + 1))
done
cat > "$WORK/tsconfig.json" <<JSON
{"compilerOptions": {"strict": true, "noEmit": true, "target": "ES2020", "module": "ES2020",
 "moduleResolution": "node", "skipLibCheck": true, "types": []}, "include": ["src/*.ts"]}
JSON
(cd "$WORK" && node_modules/.bin/tsc -p tsconfig.json)
say "$n dashboard(s) type-check against @grafana/schema $(node -p "require('$WORK/node_modules/@grafana/schema/package.json').version")"
