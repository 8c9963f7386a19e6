#!/usr/bin/env bash
# Builds Kueue's controller-manager (sigs.k8s.io/kueue/cmd/kueue) from the Go module proxy, at the
# version pinned in go.mod beside this script, and copies the files the tests install from the
# same module (its CRDs and its webhook manifests), into a cache outside the work tree:
#
#   ${MOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mot-operator}/kueue/v<kueue version>/
#     kueue                 the controller-manager
#     crd/                  config/components/crd/ of the module: the CRDs (bases/), the
#                           conversion-webhook patches (patches/) and the kustomization.yaml
#                           that says which of them an install applies
#     webhooks.yaml         config/components/webhook/manifests.yaml of the module
#
# Only what is missing is made; with all of it present it does nothing. The binary is linked under
# a temporary name and the CRDs copied into a temporary folder, each renamed into place, so an
# interrupted build never leaves something that looks complete. A lock serialises concurrent runs.
# tests/cluster/build.sh builds the Kubernetes control plane the same way; the Makefile's
# `cluster-bins` target runs both.
#
#   tests/cluster/kueue/build.sh              build what is missing
#   tests/cluster/kueue/build.sh --print-dir  print the cache directory and exit
#
# One change to Kueue's source, made at build time with `go build -overlay` (the module cache and
# the work tree stay untouched): with its internal certificate management off, cmd/kueue/main.go reads the metrics
# server's certificate from the fixed path /etc/kueue/metrics/certs and exits when it is not there.
# The overlay lets $KUEUE_METRICS_CERT_DIR name another folder (unset: the same fixed path).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

kueue_version=$(awk '$1 == "sigs.k8s.io/kueue" && $2 ~ /^v/ {print $2; exit}' "$here/go.mod")
[[ -n $kueue_version ]] || { echo "kueue/build.sh: no sigs.k8s.io/kueue version in $here/go.mod" >&2; exit 1; }
source "$here/../lib.sh"
dir=$(cache_dir kueue "$kueue_version")

if [[ ${1-} == --print-dir ]]; then
  echo "$dir"
  exit 0
fi

missing() {
  [[ -x $dir/kueue ]] || echo kueue
  [[ -d $dir/crd ]] || echo crd
  [[ -f $dir/webhooks.yaml ]] || echo webhooks.yaml
}

lock_or_done "$dir"
todo=$(missing)
go_env kueue/build.sh
cd "$here"
"$GO" mod download sigs.k8s.io/kueue
module_dir=$("$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
[[ -f $module_dir/config/components/crd/kustomization.yaml ]] || { echo "kueue/build.sh: no CRDs in $module_dir" >&2; exit 1; }

for name in $todo; do
  tmp=$dir/.$name.tmp.$$
  case $name in
    crd)
      cp -R "$module_dir/config/components/crd" "$tmp"
      chmod -R u+w "$tmp"   # the module cache is read-only
      mv -T "$tmp" "$dir/crd"
      echo "kueue/build.sh: copied $(ls "$dir/crd/bases" | wc -l) CRDs of Kueue $kueue_version into $dir/crd" >&2
      ;;
    webhooks.yaml)
      cp "$module_dir/config/components/webhook/manifests.yaml" "$tmp"
      chmod u+w "$tmp"
      mv -f "$tmp" "$dir/webhooks.yaml"
      ;;
    kueue)
      echo "kueue/build.sh: building kueue (sigs.k8s.io/kueue/cmd/kueue) $kueue_version into $dir" >&2
      start=$SECONDS
      overlay=$dir/.overlay.tmp.$$
      mkdir "$overlay"
      fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
      grep -qF "$fixed" "$module_dir/cmd/kueue/main.go" || {
        echo "kueue/build.sh: cmd/kueue/main.go of $kueue_version lacks '$fixed'; update the overlay" >&2
        rm -rf "$overlay"; exit 1; }
      sed "s|$fixed|$fixed; if d := os.Getenv(\"KUEUE_METRICS_CERT_DIR\"); d != \"\" { metricsCertPath = d }|" \
        "$module_dir/cmd/kueue/main.go" >"$overlay/main.go"
      # Go refuses to overlay files in the module cache; the patched main.go is overlaid as a new
      # package of this module instead (cmd/kueue beside go.mod, a path that exists only in the
      # overlay), built with this module's requirements: those of sigs.k8s.io/kueue/cmd/kueue.
      printf '{"Replace": {"%s": "%s"}}\n' "$here/cmd/kueue/main.go" "$overlay/main.go" >"$overlay/overlay.json"
      # In its own process group, so that stopping this script also stops the compilers and linker.
      set -m
      nice -n "${MOT_BUILD_NICE:-19}" "$GO" build -trimpath -overlay "$overlay/overlay.json" \
        -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version" \
        -o "$tmp" ./cmd/kueue &
      child=$!
      set +m
      trap 'kill -TERM -- -$child 2>/dev/null; rm -rf "$tmp" "$overlay"; exit 143' INT TERM HUP
      wait "$child" || { status=$?; rm -rf "$tmp" "$overlay"; exit "$status"; }
      trap - INT TERM HUP
      rm -rf "$overlay"
      mv -f "$tmp" "$dir/kueue"
      echo "kueue/build.sh: built kueue in $((SECONDS - start)) s" >&2
      ;;
  esac
done
