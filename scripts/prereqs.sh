#!/usr/bin/env bash
# What `make run`, `make test` and `make bench` need from the machine, checked
# (and, as root, installed) before anything is built or started:
#   scripts/prereqs.sh run    build + local servers + curl
#   scripts/prereqs.sh test   the above + Prometheus/promtool (observability
#                             test), PyYAML (compose check), libfaketime
#                             (the host clock skew tests); Go when
#                             KGS_MONGO_IMPL=ferretdb
#
# Quiet when everything is there. Missing Debian packages are installed with
# apt-get as root; otherwise one line names exactly what to install and the
# command to do it, and the exit status is 1. PyYAML comes from PyPI for the
# python3 on PATH (which may not be Debian's).
#
# librdkafka is built from its bundled sources with its own configure script
# (rdkafka without `cmake-build`), which disables curl: no libcurl headers and
# no cmake are needed.
set -euo pipefail

mode="${1:-run}"
case "$mode" in
  run | test) ;;
  *) echo "prereqs: usage: scripts/prereqs.sh {run|test}" >&2; exit 2 ;;
esac

missing_pkgs=()   # Debian packages to install
missing_other=()  # things apt cannot give (a human must install them)

need_cmd() { # command debian-package
  command -v "$1" >/dev/null 2>&1 || missing_pkgs+=("$2")
}

command -v cargo >/dev/null 2>&1 || missing_other+=("cargo (install Rust with rustup: https://rustup.rs)")
need_cmd cc gcc
need_cmd c++ g++
need_cmd make make
need_cmd pkg-config pkg-config
need_cmd perl perl
# openssl-sys and librdkafka's TLS/SASL-SCRAM link the system OpenSSL.
pkg-config --exists openssl 2>/dev/null || missing_pkgs+=(libssl-dev)
pkg-config --exists zlib 2>/dev/null || missing_pkgs+=(zlib1g-dev)
# Local servers: Kafka (Java 17+, Maven resolves the broker jars) and
# SecantusDB (a Python venv).
need_cmd java openjdk-17-jre-headless
need_cmd mvn maven
need_cmd curl curl
if command -v python3 >/dev/null 2>&1; then
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing_pkgs+=(python3-venv)
else
  missing_pkgs+=(python3 python3-venv)
fi

if [[ "$mode" == test ]]; then
  { command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing_pkgs+=(prometheus)
  # libfaketime, preloaded into a producer to shift its host clock (the
  # lease must not depend on host clocks); the library, not the command, is
  # what the tests use.
  compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null \
    || compgen -G '/usr/lib/faketime/libfaketime.so.1' >/dev/null \
    || missing_pkgs+=(faketime)
  if [[ "${KGS_MONGO_IMPL:-secantus}" == ferretdb ]]; then
    command -v go >/dev/null 2>&1 || missing_pkgs+=(golang-go)
  fi
fi

if ((${#missing_other[@]})); then
  echo "prereqs: error: missing ${missing_other[*]}" >&2
  exit 1
fi

if ((${#missing_pkgs[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "prereqs: installing ${missing_pkgs[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    # A fresh machine may have no package lists yet: update once and retry.
    if ! apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}" >"$log" 2>&1; then
      if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}"; } >>"$log" 2>&1; then
        echo "prereqs: error: apt-get install ${missing_pkgs[*]} failed, see $log" >&2
        exit 1
      fi
    fi
    rm -f "$log"
  else
    echo "prereqs: error: missing ${missing_pkgs[*]}; install with: sudo apt-get install ${missing_pkgs[*]}" >&2
    exit 1
  fi
fi

if [[ "$mode" == test ]] && ! python3 -c 'import yaml' 2>/dev/null; then
  echo "prereqs: installing PyYAML for $(command -v python3) (pip)" >&2
  python3 -m pip install -q pyyaml >/dev/null 2>&1 \
    || python3 -m pip install -q --user pyyaml >/dev/null 2>&1 \
    || { echo "prereqs: error: PyYAML missing; install with: python3 -m pip install pyyaml" >&2; exit 1; }
fi
exit 0
