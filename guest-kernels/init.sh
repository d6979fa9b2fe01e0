#!/bin/sh
# vmmd test init (busybox sh): /init of initramfs.cpio.gz, /init and /sbin/init of rootfs.ext4.
#
# Mounts /proc, /sys and devtmpfs on /dev, prints exactly one console line
#     VMMD-GUEST-READY cpus=<online cpus> mem_kib=<MemTotal in kB>
# then does what vmmd_init= asks. Unknown key=value words of the kernel command line reach init
# as environment variables, so the VMM chooses with e.g. "vmmd_init=hold" on the cmdline:
#     vmmd_init=reboot    (default) `reboot -f`: a microVM without ACPI stops by resetting through
#                         the i8042 (kernel cmdline reboot=k), as with Firecracker
#     vmmd_init=poweroff  `poweroff -f`
#     vmmd_init=hold      stay up after the READY line (sleep forever)
#     vmmd_init=shell     interactive shell on the console (job control via cttyhack); reboot -f
#                         when it exits
# Nothing else is printed unless something fails ("vmmd-init: ..." lines).
# Note: on PVM hosts guest user space cannot run at all; there the kernel's own READY hook
# (vmmd_ready=1) prints the same line before this script would start. See README.md.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mounted() {
	while read -r _ dir _; do [ "$dir" = "$1" ] && return 0; done < /proc/mounts
	return 1
}
[ -e /proc/mounts ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev	# the kernel mounts it itself on a disk root

cpus=0
read -r online < /sys/devices/system/cpu/online	# e.g. "0-1" or "0,2-3"
IFS=,
for range in $online; do
	cpus=$((cpus + ${range#*-} - ${range%-*} + 1))
done
unset IFS
mem=0
while read -r key value unit; do
	if [ "$key" = "MemTotal:" ]; then mem=$value; break; fi
done < /proc/meminfo

echo "VMMD-GUEST-READY cpus=$cpus mem_kib=$mem"

case "${vmmd_init:-reboot}" in
reboot) ;;
poweroff)
	poweroff -f
	;;
hold)
	while :; do sleep 3600; done
	;;
shell)
	setsid cttyhack sh -l
	;;
*)
	echo "vmmd-init: unknown vmmd_init=$vmmd_init, rebooting"
	;;
esac
reboot -f
# pid 1 must never exit (the kernel would panic)
while :; do sleep 3600; done
