#!/usr/bin/env bash
# Boot the guest kernel under QEMU -M microvm and time it to the READY line (a reference for vmmd
# and for checking a kernel build by hand). Kills QEMU once the line is seen (QEMU may hang in
# "Rebooting" after the guest's reset).
#
# usage: guest-kernels/qemu-boot.sh [options]
#   -k FILE    kernel (default build/guest/vmlinux; build/guest/bzImage also works)
#   -i FILE    initramfs (default build/guest/initramfs.cpio.gz; "none" for no initrd)
#   -d FILE    add FILE as a virtio-blk disk (virtio-mmio; QEMU adds virtio_mmio.device= itself)
#   -s N       vCPUs (default 2)          -m MiB   memory (default 256)
#   -t SEC     timeout (default 400)      -a TEXT  extra kernel cmdline words
#   -c TEXT    replace the whole base cmdline (default: $VMMD_GUEST_CMDLINE, see below)
#   -l FILE    console log (default: a temp file, printed on failure)
#   -C CPU     QEMU -cpu model (default host,-arch-capabilities: on PVM hosts QEMU aborts setting
#              MSR 0x10a with plain -cpu host)
# Exit 0 when "VMMD-GUEST-READY cpus=<N> ..." appeared with N = vCPUs, 1 otherwise.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$(dirname "$HERE")/build/guest

# The command line for PVM hosts (see README.md); harmless on hardware KVM.
# clearcpuid's value must stay <= 127 characters (6.1), and only the last clearcpuid= counts.
CLEARCPUID=cx16,popcnt,rdrand,rdseed,fsgsbase,pcid,invpcid,smap,rdpid,aes,pclmulqdq,sha_ni,clflushopt,clwb,movbe,sse4_2,erms,fsrm
BASE=${VMMD_GUEST_CMDLINE:-"console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd quiet noxsave no-kvm-hypercalls clearcpuid=$CLEARCPUID vmmd_ready=1"}

cpu=host,-arch-capabilities kernel=$OUT/vmlinux initrd=$OUT/initramfs.cpio.gz disk="" smp=2 mem=256 timeout=400 extra="" log=""
while getopts "k:i:d:s:m:t:a:c:l:C:h" o; do
  case $o in
    k) kernel=$OPTARG ;; i) initrd=$OPTARG ;; d) disk=$OPTARG ;; s) smp=$OPTARG ;;
    m) mem=$OPTARG ;; t) timeout=$OPTARG ;; a) extra=$OPTARG ;; c) BASE=$OPTARG ;; l) log=$OPTARG ;; C) cpu=$OPTARG ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
[ -n "$log" ] || log=$(mktemp /tmp/vmmd-qemu-boot.XXXXXX.log)
: > "$log"

# acpi=off: the kernel has no ACPI, and only then does QEMU add virtio_mmio.device= to the cmdline.
# -no-reboot: the guest's reset (READY hook, reboot -f, panic=1) ends QEMU.
args=(-M microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off -enable-kvm -cpu "$cpu" -m "$mem"
      -smp "$smp" -no-reboot -nodefaults -no-user-config -nographic -serial stdio -kernel "$kernel"
      -append "$BASE${extra:+ $extra}")
[ "$initrd" = none ] || args+=(-initrd "$initrd")
[ -z "$disk" ] || args+=(-drive "id=d0,file=$disk,format=raw,if=none" -device virtio-blk-device,drive=d0)

echo "qemu-boot: $(basename "$kernel"), $smp vCPU, $mem MiB; cmdline: $BASE${extra:+ $extra}"
start=$(date +%s.%N)
qemu-system-x86_64 "${args[@]}" < /dev/null > "$log" 2>&1 &
qpid=$!
trap 'kill "$qpid" 2>/dev/null || true' EXIT INT TERM
result=1
while kill -0 "$qpid" 2>/dev/null; do
  if line=$(grep -a -m1 -o 'VMMD-GUEST-READY cpus=[0-9]* mem_kib=[0-9]*' "$log"); then
    t=$(echo "$(date +%s.%N) - $start" | bc)
    echo "qemu-boot: READY after ${t%???????}s: $line"
    [[ $line == *"cpus=$smp "* ]] && result=0 || echo "qemu-boot: expected cpus=$smp"
    sleep 2   # let the reset happen, for the log
    break
  fi
  if [ "$(echo "$(date +%s.%N) - $start > $timeout" | bc)" = 1 ]; then
    echo "qemu-boot: TIMEOUT after ${timeout}s"
    break
  fi
  sleep 0.5
done
kill "$qpid" 2>/dev/null || true
wait "$qpid" 2>/dev/null || true
trap - EXIT INT TERM
if [ $result -ne 0 ]; then
  echo "---- console ($log) ----"; tail -n 60 "$log"
  if dmesg 2>/dev/null | tail -n 20 | grep -qi pvm; then echo "---- dmesg ----"; dmesg | grep -i pvm | tail -n 5; fi
fi
echo "qemu-boot: console log: $log"
exit $result
