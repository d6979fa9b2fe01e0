/*
 * vmmcore.h - the public interface of the vmmd C core.
 *
 * This is the only header Python sees: native/build_ffi.py feeds it to cffi's
 * cdef (after dropping preprocessor lines), so it holds plain declarations
 * only.  Every function returns 0 (or a count) on success and -errno on
 * failure; nothing here exits, aborts or longjmps.  The C core owns its
 * threads: vCPU loops and the I/O thread never call back into Python.
 */
#ifndef VMMCORE_H
#define VMMCORE_H
#include <stddef.h>
#include <stdint.h>

/* ---- guest memory (memory.c): read/write at a guest physical address ---- */
struct vmm_mem;
struct vmm_mem *vmm_mem_new(void);
void vmm_mem_free(struct vmm_mem *mem);
/* hva == NULL: the core maps anonymous memory itself (and unmaps it). */
int vmm_mem_add_region(struct vmm_mem *mem, uint64_t gpa, uint64_t size, void *hva);
/* Guest RAM from a file, MAP_PRIVATE, between guard pages like any region.
 * Should the file shrink later, an access to a page past its end fails that
 * access (-EFAULT) and stops the VM the memory belongs to, nothing else. */
int vmm_mem_add_file_region(struct vmm_mem *mem, uint64_t gpa, uint64_t size, int fd,
			    uint64_t offset);
int vmm_mem_read(const struct vmm_mem *mem, uint64_t gpa, void *buf, uint64_t len);
int vmm_mem_write(struct vmm_mem *mem, uint64_t gpa, const void *buf, uint64_t len);
int vmm_mem_region_count(const struct vmm_mem *mem);
int vmm_mem_region_get(const struct vmm_mem *mem, int idx, uint64_t *gpa, uint64_t *size);
/* Copy [offset, offset + len) of the file open as fd into guest RAM at gpa,
 * reading only its data extents (holes stay zero RAM, untouched).  Returns
 * bytes read; -ENODATA if the file is shorter. */
int64_t vmm_mem_load_fd(struct vmm_mem *mem, uint64_t gpa, int fd, uint64_t offset, uint64_t len);

/* ---- boot state of a vCPU, filled by the Python boot loader ---- */
struct vmm_segment {
	uint64_t base;
	uint32_t limit;
	uint16_t selector;
	uint8_t type, present, dpl, db, s, l, g, avl;
};

struct vmm_boot_regs {
	uint64_t rip, rsp, rbp, rsi, rbx, rflags;
	uint64_t cr0, cr3, cr4, efer;
	struct vmm_segment cs, ds, es, fs, gs, ss, tr, ldt;
	uint64_t gdt_base;
	uint16_t gdt_limit;
	uint64_t idt_base;
	uint16_t idt_limit;
};

/* ---- events: C -> Python, through an eventfd and a bounded ring ---- */
enum vmm_event_type {
	VMM_EVENT_STOPPED = 1,	/* the VM stopped by itself; reason says why */
	VMM_EVENT_PAUSED = 2,
	VMM_EVENT_RESUMED = 3,
	VMM_EVENT_DEVICE_ERROR = 4,
	VMM_EVENT_LOST = 5	/* the ring overflowed; code = events dropped */
};

enum vmm_stop_reason {
	VMM_STOP_NONE = 0,
	VMM_STOP_RESET = 1,		/* guest reset via i8042 / KVM reset event */
	VMM_STOP_HALT = 2,		/* every vCPU halted with interrupts off */
	VMM_STOP_TRIPLE_FAULT = 3,	/* KVM_EXIT_SHUTDOWN */
	VMM_STOP_FAIL_ENTRY = 4,	/* KVM_EXIT_FAIL_ENTRY; code = hw reason */
	VMM_STOP_EMULATION = 5,	/* KVM internal error: emulation failure */
	VMM_STOP_INTERNAL_ERROR = 6,	/* other KVM internal error; code = suberror */
	VMM_STOP_KVM_ERROR = 7,	/* an ioctl failed; err = errno */
	VMM_STOP_REQUESTED = 8,	/* vmm_vm_stop() from outside */
	VMM_STOP_POWEROFF = 9,		/* KVM_EXIT_SYSTEM_EVENT shutdown */
	VMM_STOP_MEMORY_FAULT = 10	/* guest RAM vanished under the VMM (its file
					 * shrank); code = the guest physical address */
};

struct vmm_event {
	uint32_t type;		/* enum vmm_event_type */
	uint32_t reason;	/* enum vmm_stop_reason for STOPPED */
	int32_t vcpu;		/* -1 when not tied to a vCPU */
	int32_t err;		/* errno for KVM_ERROR */
	uint64_t code;		/* hw reason, suberror, exit reason... */
	uint64_t rip;
	uint64_t time_ns;	/* CLOCK_MONOTONIC */
	uint32_t insn_len;
	uint8_t insn[16];	/* instruction bytes for an emulation failure */
};

/* ---- counters ---- */
struct vmm_vm_stats {
	uint64_t exits;		/* every return from KVM_RUN */
	uint64_t exits_io;
	uint64_t exits_mmio;
	uint64_t exits_hlt;
	uint64_t exits_intr;		/* -EINTR: kicks for pause/stop */
	uint64_t exits_other;
	uint64_t unhandled_io;		/* PIO to a port no device owns */
	uint64_t unhandled_mmio;	/* MMIO to an address no device owns */
	uint64_t console_bytes;		/* guest UART output */
	uint64_t console_dropped;	/* bytes the console fd could not take */
	uint64_t events_dropped;
	/* CLOCK_MONOTONIC ns (0: not yet) of the start call, of vCPU 0's first
	 * KVM_RUN and of the guest's first console byte: start -> first run is
	 * the VMM's thread start, first run -> first byte the guest's own. */
	uint64_t start_ns, first_run_ns, first_output_ns;
};

/* ---- virtio devices (virtio_mmio.c, virtq.c, virtio_blk.c, virtio_net.c, virtio_rng.c) ---- */
struct vmm_virtio_stats {
	uint64_t notifies;	/* queue notifications served */
	uint64_t requests;	/* chains completed */
	uint64_t bad_chains;	/* malformed chains: the device then needs reset */
	uint64_t io_errors;	/* requests answered with an error status */
	uint64_t bytes_read, bytes_written;
	uint64_t interrupts;
	uint64_t rx_frames, tx_frames;	/* net: frames, vsock: packets; to / from the guest */
	uint64_t bad_packets;	/* vsock: hostile or impossible packets (connection reset) */
	uint64_t connections;	/* vsock: connections established */
	uint64_t resets;	/* vsock: RSTs sent to the guest */
};

/* A virtio-blk device on plain guest memory, without KVM: the native test
 * tier drives it as a fake guest driver would (registers, then notify). */
struct vmm_virtio;
int vmm_virtio_blk_new(struct vmm_mem *mem, int image_fd, int read_only,
		       const char *serial, struct vmm_virtio **out);
void vmm_virtio_free(struct vmm_virtio *v);
uint32_t vmm_virtio_mmio_read(struct vmm_virtio *v, uint64_t off, uint32_t len);
void vmm_virtio_mmio_write(struct vmm_virtio *v, uint64_t off, uint32_t value, uint32_t len);
void vmm_virtio_get_stats(struct vmm_virtio *v, struct vmm_virtio_stats *out);
/* A virtio-net device on plain guest memory over a frame fd (a tap, or a
 * SOCK_SEQPACKET socket in tests; the caller owns the fd, non-blocking).
 * For net the stats read: requests = frames both ways, bytes_read = frame
 * bytes to the guest, bytes_written = from the guest, io_errors = frames
 * from the guest the tap refused (dropped). */
int vmm_virtio_net_new(struct vmm_mem *mem, int tap_fd, const uint8_t *mac,
		       uint32_t max_frame, struct vmm_virtio **out);
/* What the I/O thread does when the device's backend fd (the tap) is readable. */
void vmm_virtio_backend_ready(struct vmm_virtio *v);
/* A virtio entropy device on plain guest memory: each request is filled
 * from getrandom(), at most max_request bytes of it (1..65536; 0: 65536).
 * Stats: requests, bytes_read = bytes given to the guest, io_errors = short
 * fills (the host's pool not ready yet). */
int vmm_virtio_rng_new(struct vmm_mem *mem, uint32_t max_request, struct vmm_virtio **out);
/* The fd the I/O thread would poll for the device (-1: none). */
int vmm_virtio_backend_fd(struct vmm_virtio *v);
/* A virtio-vsock device on plain guest memory (virtio_vsock.h): stream
 * connections to host Unix sockets.  listen_fd: a listening SOCK_STREAM
 * Unix socket (host clients write "CONNECT <port>\n"); dir_fd: the directory
 * holding it (O_DIRECTORY), where a guest connect to host port P goes to
 * "<name>_<P>"; name: the socket's file name.  The device keeps duplicates
 * of both fds.  For vsock the stats read: rx_frames / tx_frames = packets
 * to / from the guest, bytes_read / bytes_written = stream bytes to / from
 * the guest, io_errors = host-side failures (refused connects, dead
 * sockets), bad_packets = the guest's packets refused (their connection
 * reset), connections = connections established, resets = RSTs sent. */
int vmm_virtio_vsock_new(struct vmm_mem *mem, uint64_t guest_cid, int listen_fd, int dir_fd,
			 const char *name, struct vmm_virtio **out);

/* ---- the VM (vm.c; running it: lifecycle.c; the vmm_vcpu_* calls: vcpu.c) ---- */
enum vmm_vm_state {
	VMM_VM_CREATED = 0,
	VMM_VM_RUNNING = 1,
	VMM_VM_PAUSED = 2,
	VMM_VM_STOPPED = 3
};

struct vmm_vm;
/* Opens /dev/kvm, creates the VM (TSS, identity map), the UART and i8042
 * on the PIO bus; the in-kernel irqchip and PIT2 come with the first vCPU
 * or device (after the RAM: vm.c says why).  kvm_path NULL means "/dev/kvm". */
int vmm_vm_create(const char *kvm_path, struct vmm_vm **out);
/* The same on an open /dev/kvm fd (a jailed worker cannot open the path):
 * the VM keeps a duplicate, the caller keeps and closes its own fd. */
int vmm_vm_create_fd(int kvm_fd, struct vmm_vm **out);
void vmm_vm_destroy(struct vmm_vm *vm);	/* stops, joins, closes, frees */
/* The same, but KVM's own teardown of the VM and the freeing of guest RAM
 * finish on a thread of their own after it returns (vm.c says why). */
void vmm_vm_destroy_deferred(struct vmm_vm *vm);
int vmm_vm_add_ram(struct vmm_vm *vm, uint64_t gpa, uint64_t size);
struct vmm_mem *vmm_vm_mem(struct vmm_vm *vm);
/* Creates n vCPUs without set-up: for a restore, whose state sets it all.
 * vmm_vm_create_vcpus_cpuid (below) makes them for a boot. */
int vmm_vm_create_vcpus_bare(struct vmm_vm *vm, int n);
/* KVM_GET_SUPPORTED_CPUID costs ~0.4 ms on our hosts and its answer never
 * changes: a process reads it once into a blob of vmm_cpuid_blob_size()
 * bytes and creates every later VM's vCPUs from that blob (checked). */
size_t vmm_cpuid_blob_size(void);
int vmm_vm_supported_cpuid(struct vmm_vm *vm, void *blob, size_t len);
/* n vCPUs for a boot: CPUID from the blob with per-vCPU APIC ids and
 * topology, boot MSRs, LAPIC LINT0/LINT1, FPU defaults. */
int vmm_vm_create_vcpus_cpuid(struct vmm_vm *vm, int n, const void *blob, size_t len);
int vmm_vm_vcpu_count(const struct vmm_vm *vm);
int vmm_vcpu_set_boot_regs(struct vmm_vm *vm, int idx, const struct vmm_boot_regs *regs);
/* Registers and KVM mp_state of a vCPU; only while its thread is not in
 * KVM_RUN (VM created, paused or stopped), else -EBUSY. */
int vmm_vcpu_get_regs(struct vmm_vm *vm, int idx, struct vmm_boot_regs *regs, uint32_t *mp_state);
int vmm_vm_start(struct vmm_vm *vm);
/* Pause/resume wait until every vCPU acknowledged, up to timeout_ms. */
int vmm_vm_pause(struct vmm_vm *vm, int timeout_ms);
int vmm_vm_resume(struct vmm_vm *vm);
/* Stops every thread and joins it; the VM's memory and fds stay until
 * destroy.  Safe to call in any state and more than once. */
int vmm_vm_stop(struct vmm_vm *vm);
int vmm_vm_state(const struct vmm_vm *vm);
int vmm_vm_stop_reason(const struct vmm_vm *vm);
int vmm_vm_get_stats(const struct vmm_vm *vm, struct vmm_vm_stats *out);
int vmm_vm_thread_count(const struct vmm_vm *vm);	/* live C threads */

/* Events: event_fd becomes readable when events are queued. */
int vmm_vm_event_fd(const struct vmm_vm *vm);
int vmm_vm_next_event(struct vmm_vm *vm, struct vmm_event *out); /* 1, 0 = none */

/* Console (serial.c + console.c).  Output goes to out_fd (if >= 0) and to
 * a bounded history ring read by absolute position. */
int vmm_vm_console_set_fd(struct vmm_vm *vm, int out_fd);
int vmm_vm_console_notify_fd(const struct vmm_vm *vm);
/* Copies ring bytes from *pos; advances *pos; returns bytes copied.  If
 * *pos fell out of the ring it is moved to the oldest byte kept. */
int64_t vmm_vm_console_read(struct vmm_vm *vm, uint64_t *pos, void *buf, uint64_t len);
uint64_t vmm_vm_console_head(const struct vmm_vm *vm);
int vmm_vm_console_input(struct vmm_vm *vm, const void *buf, uint64_t len);
/* A virtio-blk drive at mmio_base (4 KiB slot) raising gsi, on the image
 * open as image_fd (a regular file; the device keeps a duplicate); before
 * start.  Returns the device index. */
int vmm_vm_add_virtio_blk(struct vmm_vm *vm, int image_fd, int read_only,
			  const char *serial, uint64_t mmio_base, uint32_t gsi);
/* A virtio-net interface on an open tap fd (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, vnet header 12 bytes, O_NONBLOCK), which the caller keeps
 * open until the VM is destroyed.  max_frame: the tap's MTU + 18 (0 if
 * unknown).  Before start; returns the device index. */
int vmm_vm_add_virtio_net(struct vmm_vm *vm, int tap_fd, const uint8_t *mac, uint32_t max_frame,
			  uint64_t mmio_base, uint32_t gsi);
/* A virtio entropy device (virtio-rng), max_request as vmm_virtio_rng_new's;
 * before start; the device index. */
int vmm_vm_add_virtio_rng(struct vmm_vm *vm, uint32_t max_request, uint64_t mmio_base,
			  uint32_t gsi);
/* A virtio-vsock device (vmm_virtio_vsock_new's arguments); before start.
 * Returns the device index. */
int vmm_vm_add_virtio_vsock(struct vmm_vm *vm, uint64_t guest_cid, int listen_fd, int dir_fd,
			    const char *name, uint64_t mmio_base, uint32_t gsi);
int vmm_vm_virtio_stats(struct vmm_vm *vm, int idx, struct vmm_virtio_stats *out);
/* Ctrl-Alt-Del through the i8042 (graceful stop request). */
int vmm_vm_send_ctrl_alt_del(struct vmm_vm *vm);
/* One edge on interrupt line gsi (0..23, the IOAPIC's pins): raised then
 * lowered through KVM_IRQ_LINE, for a line no device of the core owns (the
 * ACPI GED's).  Once the irqchip exists (after the vCPUs), in any state;
 * -EINVAL for a gsi outside the pins or before the irqchip. */
int vmm_vm_pulse_irq(struct vmm_vm *vm, uint32_t gsi);

/* ---- snapshots: everything a paused VM needs to go on ----
 * state.c composes them (and does the VM-wide KVM state and the memory
 * file); each part saves and restores itself: vCPUs in vcpu.c and x86.c,
 * virtio in virtio_mmio.c, the UART in serial.c, the i8042 in i8042.c; RAM
 * slots and dirty tracking are vm.c's.  KVM structs travel as sized byte
 * blobs (the sizes are checked against the kernel headers at compile
 * time); restore treats every field as untrusted: counts and indices are
 * bounded by the part that uses them, values are KVM's to refuse. */
struct vmm_msr {
	uint32_t index;
	uint32_t pad;
	uint64_t data;
};

struct vmm_cpuid_entry {	/* struct kvm_cpuid_entry2 without its padding */
	uint32_t function, index, flags, eax, ebx, ecx, edx;
};

struct vmm_vcpu_state {
	uint8_t regs[144];	/* struct kvm_regs */
	uint8_t sregs[312];	/* struct kvm_sregs */
	uint8_t xsave[4096];	/* struct kvm_xsave */
	uint8_t xcrs[392];	/* struct kvm_xcrs */
	uint8_t debugregs[128];	/* struct kvm_debugregs */
	uint8_t lapic[1024];	/* struct kvm_lapic_state */
	uint8_t events[64];	/* struct kvm_vcpu_events */
	uint32_t mp_state;
	uint32_t nmsrs;
	struct vmm_msr msrs[256];
	uint32_t ncpuid;
	struct vmm_cpuid_entry cpuid[256];
};

struct vmm_machine_state {
	uint8_t pic_master[512];	/* struct kvm_irqchip's chip union, chip 0 */
	uint8_t pic_slave[512];		/* chip 1 */
	uint8_t ioapic[512];		/* chip 2 */
	uint8_t pit[112];		/* struct kvm_pit_state2 */
	uint64_t clock;			/* kvmclock, ns (struct kvm_clock_data.clock) */
	uint64_t realtime;		/* host CLOCK_REALTIME, ns, when clock was read;
					 * 0: not known (state saved by an older vmmd) */
};

struct vmm_virtq_state {
	uint64_t desc, avail, used;
	uint16_t size, last_avail, used_idx, signalled_used;
	uint8_t ready, event_idx, indirect, pad;
};

struct vmm_virtio_state {
	uint32_t device_id, nqueues;
	uint32_t status, dev_feat_sel, drv_feat_sel, queue_sel, int_status, config_gen;
	uint64_t driver_features;
	struct vmm_virtq_state q[3];
};

struct vmm_legacy_state {	/* the UART and the i8042 */
	uint8_t ier, lcr, mcr, scr, dll, dlm, thr_ipending, irq_level;
	uint32_t rx_len;
	uint8_t rx[64];
	uint8_t ctr, cmd, status_cmd, outp;
	uint32_t kbd_len;
	uint8_t kbd[16];
	uint64_t console_head;	/* console bytes ever written: stream offsets go on */
};

/* Save: the VM must be paused.  Restore: created, not started. */
int vmm_vcpu_save(struct vmm_vm *vm, int idx, struct vmm_vcpu_state *out);
int vmm_vcpu_restore(struct vmm_vm *vm, int idx, const struct vmm_vcpu_state *in);
int vmm_vm_save_machine(struct vmm_vm *vm, struct vmm_machine_state *out);
/* flags: VMM_RESTORE_CLOCK_REALTIME moves kvmclock forward by the host
 * wall-clock time since in->realtime (the time the state spent on disk), so
 * the guest's wall clock agrees with the host's again; without it the clock
 * goes on from in->clock, as if no time had passed. */
enum vmm_restore_flags {
	VMM_RESTORE_CLOCK_REALTIME = 1
};
int vmm_vm_restore_machine(struct vmm_vm *vm, const struct vmm_machine_state *in, uint32_t flags);
int vmm_vm_virtio_save(struct vmm_vm *vm, int idx, struct vmm_virtio_state *out);
/* -EINVAL: a field is impossible (features not offered, a queue outside
 * RAM...); nothing of the device changed. */
int vmm_vm_virtio_restore(struct vmm_vm *vm, int idx, const struct vmm_virtio_state *in);
int vmm_vm_legacy_save(struct vmm_vm *vm, struct vmm_legacy_state *out);
int vmm_vm_legacy_restore(struct vmm_vm *vm, const struct vmm_legacy_state *in);

/* Guest RAM from a file, MAP_PRIVATE: pages load when touched, writes stay
 * in this VM (copy-on-write), VMs restored from one file share its page
 * cache.  The caller may close fd afterwards. */
int vmm_vm_add_ram_file(struct vmm_vm *vm, uint64_t gpa, uint64_t size, int fd, uint64_t offset);
/* Dirty-page tracking: KVM's dirty log on every RAM slot plus the pages
 * the VMM's own devices write.  After the RAM, before start. */
int vmm_vm_track_dirty(struct vmm_vm *vm);
int vmm_vm_tracks_dirty(const struct vmm_vm *vm);
/* Write guest RAM (regions in order) to fd from offset, paused.  Full:
 * every page, all-zero pages left as holes (fd pre-sized).  diff: only
 * pages dirtied since the last write, packed, one bit each in bitmap
 * (bitmap_len bytes: RAM pages / 8, rounded up).  Either way the dirty log
 * starts again.  Returns bytes written; -EFAULT when a page of guest RAM is
 * gone (its file shrank): the VM then stops with VMM_STOP_MEMORY_FAULT. */
int64_t vmm_vm_write_memory(struct vmm_vm *vm, int fd, uint64_t offset, int diff,
			    uint8_t *bitmap, uint64_t bitmap_len);
/* Start PAUSED (a restore): no thread is made until the first resume. */
int vmm_vm_start_paused(struct vmm_vm *vm);

/* ---- cells: a worker's jail (jail.c) and system call filter (seccomp.c) ----
 * A cell worker is forked by root and still single-threaded when it
 * enters the jail, then installs the filter; see jail.h and seccomp.h. */
struct vmm_jail {
	int root_fd;		/* an empty directory made for the cell: the new /;
				 * closed by the call, success or not (jail.h) */
	uint32_t uid, gid;	/* the cell's own; never 0 */
	uint64_t nofile;	/* RLIMIT_NOFILE, soft and hard; 0 leaves it */
	uint64_t nproc;		/* RLIMIT_NPROC (the uid's threads); 0 leaves it.
				 * RLIMIT_CORE is always 0: a core holds guest RAM */
};
int vmm_jail_enter(const struct vmm_jail *j);

/* What the SIGSYS handler writes to the report fd before the worker exits
 * with status 159 (128 + SIGSYS). */
enum vmm_seccomp_const {
	VMM_SECCOMP_MAGIC = 0x5ec0bad0,
	VMM_SECCOMP_EXIT = 159
};
struct vmm_seccomp_report {
	uint32_t magic;		/* VMM_SECCOMP_MAGIC */
	int32_t syscall_nr;	/* the refused call (x86-64 numbers) */
	uint64_t ip;		/* the address it was made from */
};
/* The filter on every thread of the process, for good; no_new_privs. */
int vmm_seccomp_install(int report_fd);
/* The allowed calls' names (seccomp_allow.h): the first max into names;
 * returns how many there are. */
int vmm_seccomp_allowlist(const char **names, int max);
/* A system call number's name on this architecture; its length or -errno. */
int vmm_seccomp_syscall_name(int nr, char *buf, uint64_t len);

/* Host facts. */
int vmm_kvm_api_version(const char *kvm_path);
/* KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK) on a VM: the KVM_CLOCK_* flags
 * KVM_GET/SET_CLOCK know here (KVM_CLOCK_REALTIME = 4, KVM_CLOCK_HOST_TSC = 8). */
int vmm_kvm_clock_flags(const char *kvm_path);

/* The core's own version: bump VMM_CORE_VERSION with any change to this
 * interface, together with CORE_VERSION in vmmd/native/_lib.py, which
 * then refuses to load a core built from older sources. */
/* 7: the boot timestamps in vmm_vm_stats, the CPUID blob */
#define VMM_CORE_VERSION 7
int vmm_core_version(void);

#endif
