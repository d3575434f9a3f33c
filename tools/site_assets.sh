#!/usr/bin/env bash
# The site's browser libraries, copied from their npm packages so that the built site needs no
# CDN: Mermaid (diagrams) and KaTeX (formulas, MIT licence kept beside it). Used by
# `make setup` and by the GitHub workflows. Usage: tools/site_assets.sh [MERMAID_VERSION KATEX_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."

MERMAID_VERSION=${1:-11.17.2}
KATEX_VERSION=${2:-0.16.22}
ASSETS=inference/assets
NPM_CACHE=.cache/npm

fail() { echo "error: $*" >&2; exit 1; }
command -v npm >/dev/null || fail "npm not found: install Node.js (apt-get install nodejs npm) so the site can bundle mermaid and KaTeX"

# unpack PACKAGE@VERSION into $NPM_CACHE/PACKAGE-VERSION/package
unpack() {
  local name=$1 version=$2 folder="$NPM_CACHE/$1-$2"
  if [ ! -d "$folder/package" ]; then
    mkdir -p "$folder"
    (cd "$folder" && npm pack --silent "$name@$version" >/dev/null) || fail "npm could not fetch $name@$version from the npm registry"
    tar -xzf "$folder"/*.tgz -C "$folder"   # a range such as 11 packs as the newest 11.x
  fi
  echo "$folder/package"
}

if [ ! -s "$ASSETS/javascripts/mermaid.min.js" ]; then
  echo "==> mermaid $MERMAID_VERSION for offline diagrams"
  package=$(unpack mermaid "$MERMAID_VERSION")
  mkdir -p "$ASSETS/javascripts"
  cp "$package/dist/mermaid.min.js" "$ASSETS/javascripts/"
fi

if [ ! -s "$ASSETS/katex/katex.min.js" ]; then
  echo "==> KaTeX $KATEX_VERSION for offline formulas"
  package=$(unpack katex "$KATEX_VERSION")
  mkdir -p "$ASSETS/katex/contrib" "$ASSETS/katex/fonts"
  cp "$package/dist/katex.min.js" "$package/dist/katex.min.css" "$package/LICENSE" "$ASSETS/katex/"
  cp "$package/dist/contrib/auto-render.min.js" "$ASSETS/katex/contrib/"
  cp "$package"/dist/fonts/*.woff2 "$ASSETS/katex/fonts/"   # every browser the site supports reads woff2
fi
