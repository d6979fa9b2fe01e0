#!/usr/bin/env bash
# Build the vmmd guest kernel (vmlinux + bzImage) from Debian's linux-source-6.1.
#
# usage: guest-kernels/build-kernel.sh [OUT_DIR]      (default OUT_DIR: <repo>/build/guest)
#        guest-kernels/build-kernel.sh --print-hash   (print the cache key and exit)
#        guest-kernels/build-kernel.sh --config-only  (prepare source + .config in the cache tree, no build)
#
# Writes OUT_DIR/vmlinux, OUT_DIR/bzImage and OUT_DIR/kernel.config (files are replaced only when
# their content changed, so a Makefile that depends on them does not rebuild needlessly).
#
# Cache (outside the clone): ${VMMD_CACHE:-$HOME/.cache/vmmd}/kernel/
#   <hash>/      finished kernels; hash = sha256 of (recipe tag, Debian package version of
#                linux-source-6.1, config fragment, patches). A hit only copies files (seconds).
#   tree/src     the extracted, patched Debian source (re-extracted when the package version changes)
#   tree/obj     the stable out-of-tree build directory (O=): a rebuild after a config or patch
#                change is incremental.
#   tree/build.log  make output of the last build.
# The first build takes ~10 min on 2 cores. Environment: VMMD_CACHE (cache root),
# VMMD_KERNEL_NICE (nice level of make, default 10), VMMD_KERNEL_JOBS (default: nproc).
set -euo pipefail
export LC_ALL=C

RECIPE="vmmd-guest-kernel recipe 1"    # bump when this script changes what it builds
SRCPKG=linux-source-6.1
TARBALL=/usr/src/linux-source-6.1.tar.xz

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
FRAG=$HERE/microvm-x86_64.config
PATCHDIR=$HERE/patches
CACHE=${VMMD_CACHE:-$HOME/.cache/vmmd}/kernel
TREE=$CACHE/tree
SRC=$TREE/src
OBJ=$TREE/obj
LOG=$TREE/build.log
JOBS=${VMMD_KERNEL_JOBS:-$(nproc)}
NICE=${VMMD_KERNEL_NICE:-10}

say() { echo "build-kernel: $*"; }
die() { echo "build-kernel: ERROR: $*" >&2; exit 1; }

case "${1:-}" in
  -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

# ---------------------------------------------------------------- inputs and cache key
VERSION=$(dpkg-query -W -f='${Version}' "$SRCPKG" 2>/dev/null) ||
  die "Debian package $SRCPKG is not installed (apt-get install $SRCPKG)"
[ -n "$VERSION" ] || die "Debian package $SRCPKG is not installed (apt-get install $SRCPKG)"
[ -f "$FRAG" ] || die "missing config fragment $FRAG"
PATCHES=()
for p in "$PATCHDIR"/*.patch; do [ -f "$p" ] && PATCHES+=("$p"); done

HASH=$(
  {
    printf '%s\n' "$RECIPE" "$SRCPKG $VERSION" "== config"
    cat "$FRAG"
    for p in "${PATCHES[@]}"; do printf '== patch %s\n' "$(basename "$p")"; cat "$p"; done
  } | sha256sum | cut -d' ' -f1
)
if [ "${1:-}" = "--print-hash" ]; then echo "$HASH"; exit 0; fi

CONFIG_ONLY=0
if [ "${1:-}" = "--config-only" ]; then CONFIG_ONLY=1; shift; fi
OUT=${1:-$REPO/build/guest}
DONE=$CACHE/$HASH

install_outputs() {
  mkdir -p "$OUT"
  local name src
  for name in vmlinux bzImage kernel.config; do
    src=$DONE/$name
    if ! cmp -s "$src" "$OUT/$name"; then
      cp "$src" "$OUT/.$name.tmp" && mv -f "$OUT/.$name.tmp" "$OUT/$name"
    fi
  done
  say "kernel $HASH (Debian $SRCPKG $VERSION)"
  say "  $OUT/vmlinux  $OUT/bzImage  (cache: $DONE)"
}

if [ -f "$DONE/.complete" ] && [ $CONFIG_ONLY = 0 ]; then
  install_outputs
  exit 0
fi

# ---------------------------------------------------------------- prerequisites
[ -f "$TARBALL" ] || die "$TARBALL not found (apt-get install $SRCPKG)"
missing=()
for t in make gcc ld flex bison bc perl tar xz lz4 patch sha256sum flock cmp; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
[ -f /usr/include/gelf.h ] || missing+=("libelf-dev (gelf.h)")
[ ${#missing[@]} -eq 0 ] || die "missing build tools: ${missing[*]}
  (apt-get install build-essential flex bison bc libelf-dev libssl-dev xz-utils lz4 patch)"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  say "another kernel build holds $CACHE/.lock; waiting..."
  flock 9
fi
if [ -f "$DONE/.complete" ] && [ $CONFIG_ONLY = 0 ]; then   # built by whoever held the lock
  install_outputs
  exit 0
fi

# ---------------------------------------------------------------- source tree (patched)
extract_source() {
  say "extracting $TARBALL (Debian $VERSION) into $SRC ..."
  rm -rf "$TREE"      # a fresh source needs a fresh object tree (tar keeps old mtimes)
  mkdir -p "$TREE/src.tmp"
  tar -xJf "$TARBALL" -C "$TREE/src.tmp" --strip-components=1 ||
    die "could not extract $TARBALL"
  mkdir -p "$TREE/src.tmp/.vmmd-patches"
  echo "$VERSION" > "$TREE/src.tmp/.vmmd-source-version"
  mv "$TREE/src.tmp" "$SRC"
}

# Bring the applied patches in line with guest-kernels/patches: keep the common prefix (same names,
# same content), reverse the rest newest first, apply the new ones. Touches only files of changed
# patches, so the build stays incremental. Returns 1 if the tree is not in the state it records.
sync_patches() {
  local applied=() i=0 j p name
  for p in "$SRC"/.vmmd-patches/*.patch; do [ -f "$p" ] && applied+=("$p"); done
  while [ $i -lt ${#applied[@]} ] && [ $i -lt ${#PATCHES[@]} ] &&
        [ "$(basename "${applied[$i]}")" = "$(basename "${PATCHES[$i]}")" ] &&
        cmp -s "${applied[$i]}" "${PATCHES[$i]}"; do
    i=$((i + 1))
  done
  for ((j = ${#applied[@]} - 1; j >= i; j--)); do
    p=${applied[$j]}
    say "reverting $(basename "$p")"
    patch -d "$SRC" -p1 -R -s -F0 --no-backup-if-mismatch --dry-run < "$p" >/dev/null 2>&1 || return 1
    patch -d "$SRC" -p1 -R -s -F0 --no-backup-if-mismatch < "$p" >/dev/null || return 1
    rm -f "$p"
  done
  for ((j = i; j < ${#PATCHES[@]}; j++)); do
    p=${PATCHES[$j]}
    name=$(basename "$p")
    say "applying $name"
    if ! patch -d "$SRC" -p1 -N -s -F0 --no-backup-if-mismatch --dry-run < "$p" >"$TREE/patch.out" 2>&1; then
      cat "$TREE/patch.out" >&2
      rm -f "$SRC/.vmmd-source-version"   # next run starts from a clean extraction
      die "patch $name does not apply to Debian $SRCPKG $VERSION"
    fi
    patch -d "$SRC" -p1 -N -s -F0 --no-backup-if-mismatch < "$p" >/dev/null
    cp "$p" "$SRC/.vmmd-patches/$name"
  done
  return 0
}

if [ ! -f "$SRC/.vmmd-source-version" ] || [ "$(cat "$SRC/.vmmd-source-version")" != "$VERSION" ]; then
  extract_source
fi
if ! sync_patches; then
  say "source tree does not match its recorded patches; starting from a clean extraction"
  extract_source
  sync_patches || die "could not apply patches to a fresh $SRCPKG source"
fi

# ---------------------------------------------------------------- configuration
mkdir -p "$OBJ"
say "configuring: allnoconfig + $(basename "$FRAG") (merge_config.sh -n), olddefconfig"
(cd "$SRC" && scripts/kconfig/merge_config.sh -n -O "$OBJ" "$FRAG") > "$TREE/config.log" 2>&1 ||
  { tail -n 30 "$TREE/config.log" >&2; die "kernel configuration failed (log: $TREE/config.log)"; }
make -s -C "$SRC" O="$OBJ" olddefconfig >> "$TREE/config.log" 2>&1 ||
  { tail -n 30 "$TREE/config.log" >&2; die "make olddefconfig failed (log: $TREE/config.log)"; }

# Every line of the fragment must hold in the final .config.
bad=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF -- "$line" "$OBJ/.config" ||
      bad+=("${BASH_REMATCH[1]}: wanted ${BASH_REMATCH[2]}, got $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$OBJ/.config" || echo 'absent (unmet dependency?)')")
  elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    if grep -qE "^${BASH_REMATCH[1]}=" "$OBJ/.config"; then
      bad+=("${BASH_REMATCH[1]}: wanted off, got $(grep -E "^${BASH_REMATCH[1]}=" "$OBJ/.config")")
    fi
  fi
done < "$FRAG"
if [ ${#bad[@]} -gt 0 ]; then
  printf '  %s\n' "${bad[@]}" >&2
  die "the final .config does not honour $(basename "$FRAG") (see above)"
fi

if [ $CONFIG_ONLY = 1 ]; then say "configured: $OBJ/.config"; exit 0; fi

# ---------------------------------------------------------------- build
export KBUILD_BUILD_USER=vmmd KBUILD_BUILD_HOST=vmmd KBUILD_BUILD_VERSION=1
export KBUILD_BUILD_TIMESTAMP="Mon Jan  1 00:00:00 UTC 2024"
prev=""
full=0
if [ -f "$OBJ/vmlinux" ]; then
  say "building vmlinux + bzImage with make -j$JOBS (nice $NICE, incremental); log: $LOG"
else
  full=1
  prev=$(cat "$CACHE/full-build-steps" 2>/dev/null || true)
  say "building vmlinux + bzImage with make -j$JOBS (nice $NICE); log: $LOG"
  say "  a full build takes 4-10 minutes on 2 cores"
fi
start=$(date +%s)
nice -n "$NICE" make -C "$SRC" O="$OBJ" -j"$JOBS" vmlinux bzImage > "$LOG" 2>&1 &
mpid=$!
trap 'kill "$mpid" 2>/dev/null || true' INT TERM EXIT
last=$start
while kill -0 "$mpid" 2>/dev/null; do
  sleep 2
  now=$(date +%s)
  if [ $((now - last)) -ge 30 ]; then
    last=$now
    steps=$(grep -cE '^  [A-Z]+ ' "$LOG" || true)
    cur=$(grep -E '^  (CC|AS|LD|AR|OBJCOPY|GZIP|LZ4|XZ)' "$LOG" | tail -n 1 | sed 's/^ *//' || true)
    say "  still building... $((now - start))s, $steps steps${prev:+ of ~$prev}; now: $cur"
  fi
done
set +e
wait "$mpid"
rc=$?
set -e
trap - INT TERM EXIT
elapsed=$(( $(date +%s) - start ))
if [ $rc -ne 0 ]; then
  echo "---- last lines of $LOG ----" >&2
  grep -E 'error|Error|\*\*\*' "$LOG" | tail -n 20 >&2 || true
  tail -n 20 "$LOG" >&2
  die "kernel build failed after ${elapsed}s (make exit $rc; full log: $LOG)"
fi
[ $full = 0 ] || grep -cE '^  [A-Z]+ ' "$LOG" > "$CACHE/full-build-steps" || true
say "built in ${elapsed}s"

# ---------------------------------------------------------------- publish to the cache
rm -rf "$DONE.tmp"
mkdir -p "$DONE.tmp"
cp "$OBJ/vmlinux" "$DONE.tmp/vmlinux"
cp "$OBJ/arch/x86/boot/bzImage" "$DONE.tmp/bzImage"
cp "$OBJ/.config" "$DONE.tmp/kernel.config"
cp "$OBJ/System.map" "$DONE.tmp/System.map"
printf 'hash=%s\nsource=%s %s\nbuilt=%s\nbuild_seconds=%s\n' \
  "$HASH" "$SRCPKG" "$VERSION" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$elapsed" > "$DONE.tmp/info"
touch "$DONE.tmp/.complete"
rm -rf "$DONE"
mv "$DONE.tmp" "$DONE"

# keep the 6 most recent kernels
ls -1dt "$CACHE"/*/.complete 2>/dev/null | tail -n +7 | while read -r old; do
  rm -rf "$(dirname "$old")"
done

install_outputs
