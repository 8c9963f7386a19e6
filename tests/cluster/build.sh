#!/usr/bin/env bash
# Builds the control plane the tests start (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) from the Go module proxy, at the versions pinned in go.mod beside this script,
# into a cache outside the work tree:
#
#   ${MOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mot-operator}/kube/v<kubernetes version>/
#
# Only missing binaries are built; with all four present it does nothing. Each binary is linked
# under a temporary name in that directory and renamed into place, so an interrupted build never
# leaves a file that looks complete. A lock serialises concurrent runs.
#
#   tests/cluster/build.sh              build what is missing
#   tests/cluster/build.sh --print-dir  print the binary directory and exit
#
# Cold: ~5 min on 2 cores (measured 4 min 40 s for v1.36.5), ~3 GB of Go build cache
# (~/.cache/go-build) and ~0.8 GB of module cache; the binaries take ~290 MB. Warm: nothing to do.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$here/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ {print $2; exit}' "$here/go.mod")
[[ -n $k8s_version && -n $etcd_version ]] || { echo "build.sh: no versions in $here/go.mod" >&2; exit 1; }
source "$here/lib.sh"
dir=$(cache_dir kube "$k8s_version")

if [[ ${1-} == --print-dir ]]; then
  echo "$dir"
  exit 0
fi

declare -A packages=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
)

missing() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    [[ -x $dir/$name ]] || echo "$name"
  done
}

lock_or_done "$dir"
todo=$(missing)
go_env build.sh

kv=${k8s_version#v}
kube_ldflags=""
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=${kv%%.*}"
  kube_ldflags+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$kv") -X $pkg.gitTreeState=clean"
done

cd "$here"
for name in $todo; do
  echo "build.sh: building $name (${packages[$name]}) for Kubernetes $k8s_version, etcd $etcd_version into $dir" >&2
  tmp=$dir/.$name.tmp.$$
  start=$SECONDS
  if [[ $name == etcd ]]; then
    flags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_version"
  else
    flags="-s -w$kube_ldflags"
  fi
  # In its own process group, so that stopping this script also stops the compilers and linker.
  set -m
  nice -n "${MOT_BUILD_NICE:-19}" "$GO" build -trimpath -ldflags "$flags" -o "$tmp" "${packages[$name]}" &
  child=$!
  set +m
  trap 'kill -TERM -- -$child 2>/dev/null; rm -f "$tmp"; exit 143' INT TERM HUP
  wait "$child" || { status=$?; rm -f "$tmp"; exit "$status"; }
  trap - INT TERM HUP
  mv -f "$tmp" "$dir/$name"
  echo "build.sh: built $name in $((SECONDS - start)) s" >&2
done
