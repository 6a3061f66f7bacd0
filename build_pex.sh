#!/usr/bin/env bash
# Build uni-api's single-file executables (PEX) into dist/.
#
#   ./build_pex.sh                       all five pexes (universal + the four natives)
#   ./build_pex.sh --only universal      just the pure-Python one: any OS, CPython >= 3.10
#   ./build_pex.sh --only native-here    just the native one for this machine's OS and CPU
#   ./build_pex.sh --only universal,linux-aarch64 --dist /tmp/out
#   ./build_pex.sh --setup-only          install the pinned pex into the cache, print its python, exit
#   ./build_pex.sh --lock                re-resolve pex/lock.json (after editing requirements.txt or
#                                        pex/requirements-speedups.txt; needs PyPI)
#
# Outputs (VERSION is the file at the repo root):
#   dist/uni-api-universal-VERSION.pex        pure Python, no compiled module, CPython 3.10+, any OS
#   dist/uni-api-<os>-<arch>-VERSION.pex      CPython 3.12 + uvloop, httptools, orjson, compiled aiohttp
#                                             os-arch: linux-x86_64 linux-aarch64 macos-arm64 macos-x86_64
#   dist/<name>.pex.sha256                    sha256sum-style checksum beside each
#
# Reproducible: every build resolves from the committed lock pex/lock.json (all artifacts pinned by
# sha256) with the pinned pex (pex/requirements-build.txt) and pip (PIP_VERSION below), and the same
# builder interpreter gives the same bytes. Foreign platforms come from the complete-platform files
# pex/*.json, so everything builds on one Linux machine; nothing is ever compiled.
#
# Environment:
#   UNI_API_BUILD_PYTHON  builder interpreter (default: python3.11). The bytes depend on its version and
#                         path (pex records both), so keep it fixed to reproduce a release.
#   UNI_API_PEX_CACHE     cache folder (default: .pex-cache/ in the repo): the pex venv, keyed by pex
#                         version and builder, and pex's download cache. Delete it for a cold build.
set -euo pipefail

PIP_VERSION=26.2.1          # the pip pex resolves and downloads with; also recorded in pex/lock.json
DEFAULT_BUILD_PYTHON=python3.11
NATIVE_PYTHON=cp312         # CPython version of the native pexes (pex/<os>-<arch>-cp312.json)
LOCK_PYTHONS='CPython>=3.10,<3.15'
NATIVE_TARGETS="linux-x86_64 linux-aarch64 macos-arm64 macos-x86_64"
UNIVERSAL_PLATFORMS="cp310 cp311 cp312 cp313 cp314"
# What the app needs at run time, staged into the pex (never `-D .`: that packs .git, tests, api.yaml).
APP_FILES="uni_api.py adapters.py scheduler.py VERSION"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$REPO"

die() { echo "build_pex.sh: error: $*" >&2; exit 1; }
note() { echo "build_pex.sh: $*" >&2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

ONLY=""
DIST="$REPO/dist"
MODE=build
while [ $# -gt 0 ]; do
    case "$1" in
        --only) [ $# -ge 2 ] || die "--only needs a value"; ONLY="$2"; shift 2 ;;
        --only=*) ONLY="${1#--only=}"; shift ;;
        --dist) [ $# -ge 2 ] || die "--dist needs a folder"; DIST="$2"; shift 2 ;;
        --dist=*) DIST="${1#--dist=}"; shift ;;
        --lock) MODE=lock; shift ;;
        --setup-only) MODE=setup; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# --- A quiet, reproducible environment -------------------------------------------------------------
# No stray PEX_* setting may change what pex does (PEX_PYTHON, PEX_VERBOSE, PEX_ROOT, ...).
for var in $(env | sed -n 's/^\(PEX_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$var"; done
CACHE="${UNI_API_PEX_CACHE:-$REPO/.pex-cache}"
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
export PEX_ROOT="$CACHE/pex_root"       # pex's downloads, pip and built wheels: what makes warm builds fast
export SOURCE_DATE_EPOCH=315532800      # 1980-01-01, the zip epoch pex also stamps every entry with
export PYTHONHASHSEED=0 TZ=UTC LC_ALL=C
umask 022

# --- The builder interpreter and the pinned pex ----------------------------------------------------
BUILD_PYTHON_CMD="${UNI_API_BUILD_PYTHON:-$DEFAULT_BUILD_PYTHON}"
# Ask the interpreter for its real path (a pyenv shim or a venv python gives the base interpreter).
probe='import sys, hashlib
base = getattr(sys, "_base_executable", None) or sys.executable
print(base)
print("cp%d%d" % sys.version_info[:2])
print("%d.%d.%d" % sys.version_info[:3])
print(hashlib.sha256(base.encode()).hexdigest()[:10])'
if ! probe_out=$("$BUILD_PYTHON_CMD" -c "$probe" 2>/dev/null); then
    if [ -z "${UNI_API_BUILD_PYTHON:-}" ] && probe_out=$(python3 -c "$probe" 2>/dev/null); then
        note "warning: $DEFAULT_BUILD_PYTHON is not runnable here; building with python3 instead."
        note "warning: the pexes will work but their bytes differ from builds made with $DEFAULT_BUILD_PYTHON."
    else
        die "cannot run the builder interpreter '$BUILD_PYTHON_CMD' (set UNI_API_BUILD_PYTHON)"
    fi
fi
BUILD_PYTHON=$(echo "$probe_out" | sed -n 1p)
BUILD_TAG=$(echo "$probe_out" | sed -n 2p)
BUILD_FULL=$(echo "$probe_out" | sed -n 3p)
BUILD_ID=$(echo "$probe_out" | sed -n 4p)

PEX_VERSION=$(sed -n 's/^pex==\([0-9][0-9.]*\).*/\1/p' pex/requirements-build.txt)
[ -n "$PEX_VERSION" ] || die "no 'pex==X' pin in pex/requirements-build.txt"
PEX_VENV="$CACHE/pex-$PEX_VERSION-$BUILD_TAG-$BUILD_ID"
PEX_PY="$PEX_VENV/bin/python"

if [ ! -f "$PEX_VENV/.complete" ]; then
    note "installing pex $PEX_VERSION for CPython $BUILD_FULL into ${PEX_VENV#"$REPO"/}"
    rm -rf "$PEX_VENV"
    if ! { "$BUILD_PYTHON" -m venv "$PEX_VENV" &&
           "$PEX_PY" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
               --only-binary :all: --require-hashes -r pex/requirements-build.txt; }; then
        rm -rf "$PEX_VENV"
        echo "build_pex.sh: cannot install pex $PEX_VERSION (is PyPI reachable?)" >&2
        exit 3
    fi
    touch "$PEX_VENV/.complete"
fi
[ "$("$PEX_PY" -m pex --version)" = "$PEX_VERSION" ] || die "the pex in $PEX_VENV is not $PEX_VERSION"

if [ "$MODE" = setup ]; then
    echo "$PEX_PY"
    exit 0
fi

[ -f requirements.txt ] || die "requirements.txt not found at the repo root"

if [ "$MODE" = lock ]; then
    note "resolving pex/lock.json for $LOCK_PYTHONS on Linux and macOS (wheels only)"
    "$PEX_PY" -m pex.cli lock create \
        --style universal --target-system linux --target-system mac \
        --interpreter-constraint "$LOCK_PYTHONS" \
        --pip-version "$PIP_VERSION" --wheel --no-build \
        -r requirements.txt -r pex/requirements-speedups.txt \
        --indent 2 -o pex/lock.json.tmp
    mv pex/lock.json.tmp pex/lock.json
    note "wrote pex/lock.json; rebuild, run tests/test_pex.py and commit it"
    exit 0
fi

# --- What to build ----------------------------------------------------------------------------------
native_here() {
    local os arch
    case "$(uname -s)" in
        Linux) os=linux ;;
        Darwin) os=macos ;;
        *) die "no native pex for $(uname -s): use the universal one (--only universal)" ;;
    esac
    case "$(uname -m)" in
        x86_64|amd64) arch=x86_64 ;;
        aarch64|arm64) if [ "$os" = macos ]; then arch=arm64; else arch=aarch64; fi ;;
        *) die "no native pex for $(uname -m): use the universal one (--only universal)" ;;
    esac
    echo "$os-$arch"
}

TARGETS=""
for t in $(echo "${ONLY:-universal $NATIVE_TARGETS}" | tr ',' ' '); do
    case "$t" in
        native-here) t=$(native_here) ;;
        universal) ;;
        *) case " $NATIVE_TARGETS " in *" $t "*) ;; *) die "unknown target '$t' (universal, native-here, $NATIVE_TARGETS)" ;; esac ;;
    esac
    case " $TARGETS " in *" $t "*) ;; *) TARGETS="$TARGETS $t" ;; esac
done

[ -f VERSION ] || die "VERSION not found at the repo root"
VERSION=$(tr -d ' \t\r\n' < VERSION)
echo "$VERSION" | grep -Eq '^[0-9A-Za-z][0-9A-Za-z.+_-]*$' || die "VERSION '$VERSION' is not a version"
[ -f pex/lock.json ] || die "pex/lock.json not found (./build_pex.sh --lock makes it)"

# Stage the app's own files; the pex gets exactly these (plus the locked dependencies).
STAGE=$(mktemp -d "$CACHE/stage.XXXXXX")
# The universal pex takes requirements.txt without its compiled modules (httptools, orjson, zstandard).
UNIVERSAL_REQS=$(mktemp "$CACHE/requirements-universal.XXXXXX")
trap 'rm -rf "$STAGE" "$UNIVERSAL_REQS"' EXIT
grep -vE '^(httptools|orjson|zstandard)\b' requirements.txt > "$UNIVERSAL_REQS"
for f in $APP_FILES; do
    if [ -f "$f" ]; then
        cp "$f" "$STAGE/$f"
        chmod 0644 "$STAGE/$f"
    elif [ "$f" = uni_api.py ] || [ "$f" = VERSION ]; then
        die "$f not found at the repo root"
    else
        note "warning: $f not found, not packed"
    fi
done

mkdir -p "$DIST"
DIST=$(cd "$DIST" && pwd)
note "pex $PEX_VERSION, pip $PIP_VERSION, builder CPython $BUILD_FULL ($BUILD_PYTHON)"

sha256_file() {
    "$BUILD_PYTHON" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
}

build_one() {
    local target="$1" name platforms reqs
    if [ "$target" = universal ]; then
        platforms=""
        for py in $UNIVERSAL_PLATFORMS; do
            platforms="$platforms --complete-platform pex/universal-$py.json"
        done
        reqs="-r $UNIVERSAL_REQS"
    else
        platforms="--complete-platform pex/$target-$NATIVE_PYTHON.json"
        reqs="-r requirements.txt -r pex/requirements-speedups.txt"
    fi
    name="uni-api-$target-$VERSION.pex"
    local start=$SECONDS
    # --venv: the first run lays the pex out as a venv under ~/.cache/pex; later starts skip that work.
    # --sh-boot: a /bin/sh preamble finds a python when run as ./x.pex. -e keeps uni_api's own CLI.
    # shellcheck disable=SC2086  # $platforms and $reqs are word lists on purpose
    if ! "$PEX_PY" -m pex \
            --lock pex/lock.json --pip-version "$PIP_VERSION" --no-build \
            $reqs $platforms \
            -D "$STAGE" -e uni_api:main \
            --venv --sh-boot \
            -o "$DIST/.$name.$$.tmp" >/dev/null; then
        rm -f "$DIST/.$name.$$.tmp"
        die "pex failed for $target (after a change to requirements.txt, re-lock: ./build_pex.sh --lock)"
    fi
    mv -f "$DIST/.$name.$$.tmp" "$DIST/$name"
    local sum
    sum=$(sha256_file "$DIST/$name")
    echo "$sum  $name" > "$DIST/$name.sha256"
    local size
    size=$(wc -c < "$DIST/$name" | tr -d ' ')
    echo "built ${DIST#"$REPO"/}/$name  $size bytes  sha256 $sum  ($((SECONDS - start)) s)"
}

for t in $TARGETS; do
    build_one "$t"
done
