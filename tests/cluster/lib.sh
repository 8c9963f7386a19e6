# Shared by build.sh and kueue/build.sh (sourced): the cache folder, the lock, the Go environment.

# cache_dir KIND VERSION: the folder a build fills, outside the work tree.
cache_dir() {
  echo "${MOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mot-operator}/$1/$2"
}

# lock_or_done DIR: exit 0 when the caller's `missing` lists nothing, before and again after taking
# DIR's lock (another run may have built everything meanwhile); then clear the temporary files an
# interrupted run left (we hold the lock).
lock_or_done() {
  [[ -z $(missing) ]] && exit 0
  mkdir -p "$1"
  exec 9>"$1/.lock"
  flock 9
  [[ -z $(missing) ]] && exit 0
  rm -rf "$1"/.*.tmp.*
}

# go_env SCRIPT: check the toolchain and export the build environment.
go_env() {
  command -v "$GO" >/dev/null || { echo "$1: no Go toolchain (set GO=/path/to/go)" >&2; exit 1; }
  export GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0
  # Built with Go's JSON v2 experiment (the default from Go 1.27), the apiserver answers /openapi/v2
  # with 503 and `kubectl apply` fails; client-go and controller-runtime were not released against it
  # either. Turn it off when this toolchain has it on.
  if "$GO" list -f '{{context.ToolTags}}' runtime | grep -qw 'goexperiment.jsonv2'; then
    export GOEXPERIMENT=${GOEXPERIMENT:+$GOEXPERIMENT,}nojsonv2
  fi
}
