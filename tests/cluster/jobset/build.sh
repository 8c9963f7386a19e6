#!/usr/bin/env bash
# Builds JobSet's controller-manager (sigs.k8s.io/jobset: the module root is its main package) from
# the Go module proxy, at the version pinned in go.mod beside this script, and copies the files the
# tests install from the same module (its CRD and its webhook manifests), into a cache outside the
# work tree:
#
#   ${MOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mot-operator}/jobset/v<jobset version>/
#     jobset                the controller-manager (upstream's image calls it `manager`)
#     crd/                  config/components/crd/ of the module: the CRD (bases/), the
#                           conversion-webhook patch (patches/) and the kustomization.yaml
#     webhook/              config/components/webhook/ of the module: manifests.yaml and the
#                           patches its kustomization.yaml applies (the Pod webhooks' objectSelector)
#
# Only what is missing is made; with all of it present it does nothing. The binary is linked under
# a temporary name and the folders copied under temporary names, each renamed into place, so an
# interrupted build never leaves something that looks complete. A lock serialises concurrent runs.
# No change to JobSet's source: everything its manager needs outside a cluster (webhook and metrics
# certificate folders, bind addresses, no leader election, no internal cert management) is set by
# its Configuration file and flags (tests/support/jobset.py). The Makefile's `cluster-bins` runs it.
#
#   tests/cluster/jobset/build.sh              build what is missing
#   tests/cluster/jobset/build.sh --print-dir  print the cache directory and exit
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

jobset_version=$(awk '$1 == "sigs.k8s.io/jobset" && $2 ~ /^v/ {print $2; exit}' "$here/go.mod")
[[ -n $jobset_version ]] || { echo "jobset/build.sh: no sigs.k8s.io/jobset version in $here/go.mod" >&2; exit 1; }
source "$here/../lib.sh"
dir=$(cache_dir jobset "$jobset_version")

if [[ ${1-} == --print-dir ]]; then
  echo "$dir"
  exit 0
fi

missing() {
  [[ -x $dir/jobset ]] || echo jobset
  [[ -d $dir/crd ]] || echo crd
  [[ -d $dir/webhook ]] || echo webhook
}

lock_or_done "$dir"
todo=$(missing)
go_env jobset/build.sh
cd "$here"
"$GO" mod download sigs.k8s.io/jobset
module_dir=$("$GO" list -m -f '{{.Dir}}' sigs.k8s.io/jobset)
for need in config/components/crd/kustomization.yaml config/components/webhook/manifests.yaml main.go; do
  [[ -f $module_dir/$need ]] || { echo "jobset/build.sh: no $need in $module_dir" >&2; exit 1; }
done

for name in $todo; do
  tmp=$dir/.$name.tmp.$$
  case $name in
    crd|webhook)
      cp -R "$module_dir/config/components/$name" "$tmp"
      chmod -R u+w "$tmp"   # the module cache is read-only
      mv -T "$tmp" "$dir/$name"
      echo "jobset/build.sh: copied config/components/$name of JobSet $jobset_version into $dir/$name" >&2
      ;;
    jobset)
      echo "jobset/build.sh: building jobset (sigs.k8s.io/jobset) $jobset_version into $dir" >&2
      start=$SECONDS
      # In its own process group, so that stopping this script also stops the compilers and linker.
      set -m
      nice -n "${MOT_BUILD_NICE:-19}" "$GO" build -trimpath \
        -ldflags "-s -w -X sigs.k8s.io/jobset/pkg/version.GitVersion=$jobset_version" \
        -o "$tmp" sigs.k8s.io/jobset &
      child=$!
      set +m
      trap 'kill -TERM -- -$child 2>/dev/null; rm -f "$tmp"; exit 143' INT TERM HUP
      wait "$child" || { status=$?; rm -f "$tmp"; exit "$status"; }
      trap - INT TERM HUP
      mv -f "$tmp" "$dir/jobset"
      echo "jobset/build.sh: built jobset in $((SECONDS - start)) s" >&2
      ;;
  esac
done
