/*
 * vcpu.c - vCPU creation, the KVM_RUN loop, and the public per-vCPU calls
 * (boot registers, registers, snapshot state: checked here, done in x86.c).
 *
 * Kicking: a control thread sets a flag (pause_req / stop_req /
 * probe_halt), then kvm_run->immediate_exit, then signals the vCPU thread
 * with an empty real-time signal handler.  The loop clears immediate_exit
 * BEFORE reading the flags, so a kick that lands between the check and
 * KVM_RUN still makes KVM_RUN return at once: no kick is ever lost.
 */
#define _GNU_SOURCE	/* pthread_setname_np */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"
#include "guard.h"
#include "lifecycle.h"
#include "vcpu.h"

static int kick_signal(void)
{
	return SIGRTMIN + 3;
}

static void kick_handler(int sig)
{
	(void)sig;	/* its only job is to make KVM_RUN return -EINTR */
}

static pthread_once_t handler_once = PTHREAD_ONCE_INIT;

static void install_handler(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler;
	sigemptyset(&sa.sa_mask);
	sigaction(kick_signal(), &sa, NULL);
}

int vmm_vcpu_create(struct vmm_vm *vm, int idx, int bare, struct vmm_vcpu **out)
{
	struct vmm_vcpu *vc = calloc(1, sizeof(*vc));
	if (!vc)
		return -ENOMEM;
	vc->vm = vm;
	vc->idx = idx;
	vc->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, (unsigned long)idx);
	if (vc->fd < 0) {
		int err = -errno;
		free(vc);
		return err;
	}
	vc->run = mmap(NULL, (size_t)vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vc->fd, 0);
	if (vc->run == MAP_FAILED) {
		int err = -errno;
		close(vc->fd);
		free(vc);
		return err;
	}
	vmm_kvmstats_open(&vc->kstats, vc->fd);
	/* bare: a restore sets every register, MSR and CPUID leaf right after */
	int r = bare ? 0 : vmm_x86_setup_vcpu(vm, vc);
	if (r < 0) {
		vmm_vcpu_destroy(vc);
		return r;
	}
	*out = vc;
	return 0;
}

void vmm_vcpu_destroy(struct vmm_vcpu *vc)
{
	if (!vc)
		return;
	munmap(vc->run, (size_t)vc->vm->run_size);
	vmm_kvmstats_close(&vc->kstats);
	close(vc->fd);
	free(vc);
}

void vmm_vcpu_kick(struct vmm_vcpu *vc)
{
	STORE(&vc->run->immediate_exit, 1);
	if (LOAD(&vc->started))
		pthread_kill(vc->thread, kick_signal());
}

/* ---- exit handlers: return 0 to continue, 1 when the VM stops ---- */

static int stop_with(struct vmm_vcpu *vc, int reason, uint64_t code, int err)
{
	struct vmm_event ev = { .type = VMM_EVENT_STOPPED, .reason = (uint32_t)reason,
				.vcpu = vc->idx, .code = code, .err = err };
	struct kvm_regs regs;
	if (ioctl(vc->fd, KVM_GET_REGS, &regs) == 0)
		ev.rip = regs.rip;
	vmm_vm_request_stop(vc->vm, reason, &ev);
	return 1;
}

static int handle_io(struct vmm_vcpu *vc)
{
	struct kvm_run *run = vc->run;
	uint64_t size = run->io.size, count = run->io.count;
	uint64_t off = run->io.data_offset;
	uint64_t total = size * count;
	/* KVM fills these, but the buffer lies in a page we index: check. */
	if ((size != 1 && size != 2 && size != 4) || total > (uint64_t)vc->vm->run_size ||
	    off > (uint64_t)vc->vm->run_size - total)
		return stop_with(vc, VMM_STOP_INTERNAL_ERROR, KVM_EXIT_IO, EINVAL);
	uint8_t *p = (uint8_t *)run + off;
	vc->st.io++;
	for (uint64_t i = 0; i < count; i++, p += size) {
		int r;
		if (run->io.direction == KVM_EXIT_IO_OUT) {
			r = vmm_bus_write(&vc->vm->pio, run->io.port, p, (uint32_t)size);
		} else {
			r = vmm_bus_read(&vc->vm->pio, run->io.port, p, (uint32_t)size);
			if (r < 0)
				memset(p, 0xff, size);	/* floating ISA bus */
		}
		if (r < 0)
			vc->st.unhandled_io++;
	}
	return 0;
}

static int handle_mmio(struct vmm_vcpu *vc)
{
	struct kvm_run *run = vc->run;
	uint32_t len = run->mmio.len;
	if (len == 0 || len > sizeof(run->mmio.data))
		return stop_with(vc, VMM_STOP_INTERNAL_ERROR, KVM_EXIT_MMIO, EINVAL);
	vc->st.mmio++;
	int r;
	if (run->mmio.is_write) {
		r = vmm_bus_write(&vc->vm->mmio, run->mmio.phys_addr, run->mmio.data, len);
	} else {
		r = vmm_bus_read(&vc->vm->mmio, run->mmio.phys_addr, run->mmio.data, len);
		if (r < 0)
			memset(run->mmio.data, 0xff, len);
	}
	if (r < 0)
		vc->st.unhandled_mmio++;
	return 0;
}

/* Instruction bytes at the failing RIP: from KVM when it gives them, else
 * read through the guest page tables (KVM_TRANSLATE) from guest RAM. */
static void fetch_insn(struct vmm_vcpu *vc, struct vmm_event *ev)
{
	struct kvm_run *run = vc->run;
	if (run->emulation_failure.ndata >= 3 &&
	    (run->emulation_failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) {
		uint32_t n = run->emulation_failure.insn_size;
		if (n > sizeof(run->emulation_failure.insn_bytes))
			n = sizeof(run->emulation_failure.insn_bytes);
		memcpy(ev->insn, run->emulation_failure.insn_bytes, n);
		ev->insn_len = n;
		return;
	}
	struct kvm_translation tr = { .linear_address = ev->rip };
	if (ioctl(vc->fd, KVM_TRANSLATE, &tr) < 0 || !tr.valid)
		return;
	for (uint32_t n = 15; n > 0; n--) {
		if (vmm_mem_read(vc->vm->mem, tr.physical_address, ev->insn, n) == 0) {
			ev->insn_len = n;
			return;
		}
	}
}

static int handle_internal_error(struct vmm_vcpu *vc)
{
	struct kvm_run *run = vc->run;
	struct vmm_event ev = { .type = VMM_EVENT_STOPPED, .vcpu = vc->idx,
				.code = run->internal.suberror };
	ev.reason = run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION ?
		    VMM_STOP_EMULATION : VMM_STOP_INTERNAL_ERROR;
	struct kvm_regs regs;
	if (ioctl(vc->fd, KVM_GET_REGS, &regs) == 0)
		ev.rip = regs.rip;
	if (ev.reason == VMM_STOP_EMULATION)
		fetch_insn(vc, &ev);
	vmm_vm_request_stop(vc->vm, (int)ev.reason, &ev);
	return 1;
}

static int handle_system_event(struct vmm_vcpu *vc)
{
	switch (vc->run->system_event.type) {
	case KVM_SYSTEM_EVENT_SHUTDOWN:
		return stop_with(vc, VMM_STOP_POWEROFF, 0, 0);
	case KVM_SYSTEM_EVENT_RESET:
		return stop_with(vc, VMM_STOP_RESET, 0, 0);
	default:
		return stop_with(vc, VMM_STOP_INTERNAL_ERROR, vc->run->system_event.type, 0);
	}
}

static int handle_exit(struct vmm_vcpu *vc)
{
	struct kvm_run *run = vc->run;
	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		return handle_io(vc);
	case KVM_EXIT_MMIO:
		return handle_mmio(vc);
	case KVM_EXIT_HLT:
		vc->st.hlt++;
		return stop_with(vc, VMM_STOP_HALT, 0, 0);
	case KVM_EXIT_SHUTDOWN:
		return stop_with(vc, VMM_STOP_TRIPLE_FAULT, 0, 0);
	case KVM_EXIT_FAIL_ENTRY:
		return stop_with(vc, VMM_STOP_FAIL_ENTRY,
				 run->fail_entry.hardware_entry_failure_reason, 0);
	case KVM_EXIT_INTERNAL_ERROR:
		return handle_internal_error(vc);
	case KVM_EXIT_SYSTEM_EVENT:
		return handle_system_event(vc);
	case KVM_EXIT_INTR:
	case KVM_EXIT_IRQ_WINDOW_OPEN:
		vc->st.intr++;
		return 0;
	default:
		vc->st.other++;
		return stop_with(vc, VMM_STOP_INTERNAL_ERROR, run->exit_reason, 0);
	}
}

/* ---- the halt watchdog ----
 * With an in-kernel LAPIC, HLT never exits to us, so a guest that halts
 * every vCPU with interrupts off (Linux's halt without ACPI) would hang
 * silently.  Every second (the I/O thread's timer) a round looks at each
 * vCPU's activity: its exits to us, and KVM's own counts of the HLTs it
 * ran and the interrupts and NMIs it took (kvmstats.h: a pread, the vCPU
 * undisturbed).  A vCPU quiet for a round is kicked once and answers from
 * its own thread (KVM_GET_MP_STATE, RFLAGS.IF) - and that answer stands,
 * with no more kicks, for as long as the vCPU stays quiet: it is halted (or
 * spinning) exactly as it was when it answered.  Two rounds in a row of
 * "all dead" stop the VM with reason HALT.  Cost: one kick per vCPU per
 * quiet spell, so an idle VM costs no exits.  (Where KVM has no statistics,
 * an idle vCPU is kicked every round, as before.)
 *
 * An idle kernel is not quiet for good: a tickless Linux wakes for a timer
 * every few seconds, and each quiet spell after that would cost a kick
 * (measured: 0.4 kicks per idle Linux VM per second).  So a vCPU that
 * answered "alive" is asked again only after twice as many quiet rounds as
 * before, up to ASK_AFTER_MAX: once its spells are shorter than that, it is
 * never kicked again.  The price: a guest that halts with interrupts off
 * after such a history stops (HALT) up to ASK_AFTER_MAX + 2 rounds after
 * its last activity instead of 3. */
#define ASK_AFTER_MAX 16	/* rounds (seconds) */

/* The answer: 1 = halted with interrupts off (dead unless an NMI comes),
 * 2 = waiting for INIT/SIPI, 0 = alive; with the activity it was given at. */
static void answer_probe(struct vmm_vcpu *vc)
{
	struct kvm_mp_state mp;
	struct kvm_regs regs;
	int dead = 0;
	if (ioctl(vc->fd, KVM_GET_MP_STATE, &mp) == 0) {
		if (mp.mp_state == KVM_MP_STATE_HALTED &&
		    ioctl(vc->fd, KVM_GET_REGS, &regs) == 0 && !(regs.rflags & 0x200))
			dead = 1;
		else if (mp.mp_state == KVM_MP_STATE_UNINITIALIZED ||
			 mp.mp_state == KVM_MP_STATE_INIT_RECEIVED)
			dead = 2;
	}
	STORE(&vc->answered_exits, vc->st.exits - vc->st.intr);
	STORE(&vc->answered_kvm, vmm_kvmstats_activity(&vc->kstats));
	STORE(&vc->dead_halt, dead);
	STORE(&vc->answered, 1);
	STORE(&vc->probe_halt, 0);
}

/* Nothing happened in the vCPU since it last answered: the answer stands. */
static int answer_stands(struct vmm_vcpu *vc, uint64_t act, uint64_t kvm)
{
	return kvm != VMM_KVMSTATS_NONE && LOAD(&vc->answered) && !LOAD(&vc->probe_halt) &&
	       LOAD(&vc->answered_exits) == act && LOAD(&vc->answered_kvm) == kvm;
}

/* One round, on the I/O thread: reads the counters, asks the vCPUs that
 * went quiet. */
void vmm_vcpus_probe_halt(struct vmm_vm *vm, int *rounds)
{
	if (LOAD(&vm->state) != VMM_VM_RUNNING || LOAD(&vm->pause_req) || LOAD(&vm->stop_req)) {
		*rounds = 0;
		return;
	}
	int all_dead = 1, any_halted = 0;
	for (int i = 0; i < vm->nvcpus; i++) {
		struct vmm_vcpu *vc = vm->vcpus[i];
		/* Kicks are not activity: they are our own probes. */
		uint64_t act = LOAD(&vc->st.exits) - LOAD(&vc->st.intr);
		uint64_t kvm = vmm_kvmstats_activity(&vc->kstats);
		int stands = answer_stands(vc, act, kvm);
		if (!stands && (act != vc->last_exits || kvm != vc->last_kvm)) {
			vc->last_exits = act;
			vc->last_kvm = kvm;
			vc->quiet_rounds = 0;
			all_dead = 0;
			STORE(&vc->dead_halt, 0);
			STORE(&vc->answered, 0);
			continue;
		}
		if (LOAD(&vc->probe_halt)) {
			all_dead = 0;	/* still busy in the guest: not answered */
			continue;
		}
		int d = LOAD(&vc->dead_halt);
		if (d == 0)
			all_dead = 0;
		if (d == 1)
			any_halted = 1;
		if (stands)
			continue;
		/* Without KVM's statistics an answer never stands: ask every round. */
		int stats = kvm != VMM_KVMSTATS_NONE;
		if (stats && ++vc->quiet_rounds < (vc->ask_after ? vc->ask_after : 1)) {
			all_dead = 0;	/* not asked yet: unknown, so not dead */
			continue;
		}
		/* Asked now; the next spell waits twice as long (a "dead" answer
		 * stands, and ends the VM, before that matters). */
		if (stats) {
			vc->ask_after = vc->ask_after ? vc->ask_after * 2 : 2;
			if (vc->ask_after > ASK_AFTER_MAX)
				vc->ask_after = ASK_AFTER_MAX;
			vc->quiet_rounds = 0;
		}
		STORE(&vc->probe_halt, 1);	/* ask again for the next round */
		vmm_vcpu_kick(vc);
	}
	*rounds = (all_dead && any_halted) ? *rounds + 1 : 0;
	if (*rounds >= 2) {
		struct vmm_event ev = { .type = VMM_EVENT_STOPPED, .reason = VMM_STOP_HALT, .vcpu = -1 };
		vmm_vm_request_stop(vm, VMM_STOP_HALT, &ev);
	}
}

/* A PIO/MMIO exit is complete (the IN data in RAX, RIP past the
 * instruction) only once KVM_RUN is entered again.  Before a pause - which a
 * snapshot may follow - enter it with immediate_exit set: KVM finishes the
 * instruction and returns at once without running the guest (KVM API doc,
 * "kvm_run", on completing operations before migration). */
static void complete_io(struct vmm_vcpu *vc)
{
	STORE(&vc->run->immediate_exit, 1);
	if (ioctl(vc->fd, KVM_RUN, 0) == 0)
		handle_exit(vc);	/* not expected; keep the exit's effect anyway */
	STORE(&vc->run->immediate_exit, 0);
}

static void *vcpu_main(void *arg)
{
	struct vmm_vcpu *vc = arg;
	struct vmm_vm *vm = vc->vm;
	sigset_t set;
	char name[16];
	/* "vcpu<N>", as top -H and ps -L show it: a VM's costs told apart. */
	snprintf(name, sizeof(name), "vcpu%d", vc->idx);
	pthread_setname_np(pthread_self(), name);
	/* Process signals (SIGINT, SIGTERM) belong to Python's main thread;
	 * fault signals stay deliverable (MMIO writes run devices guarded). */
	vmm_guard_thread_sigset(&set);
	sigdelset(&set, kick_signal());
	pthread_sigmask(SIG_SETMASK, &set, NULL);

	int io_exit = 0;	/* the last exit was PIO/MMIO: KVM finishes it on re-entry */
	int ran = 0;		/* entered KVM_RUN once (vmm_vm_stats.first_run_ns) */
	for (;;) {
		STORE(&vc->run->immediate_exit, 0);
		if (LOAD(&vm->stop_req))
			break;
		if (LOAD(&vm->pause_req)) {
			if (io_exit)
				complete_io(vc);
			io_exit = 0;
			vmm_lifecycle_park(vm, NULL);
			continue;
		}
		if (LOAD(&vc->probe_halt))
			answer_probe(vc);
		if (!ran) {
			ran = 1;
			if (vc->idx == 0)
				STORE(&vm->first_run_ns, vmm_now_ns());
		}
		int r = ioctl(vc->fd, KVM_RUN, 0);
		__atomic_add_fetch(&vc->st.exits, 1, __ATOMIC_RELAXED);
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				__atomic_add_fetch(&vc->st.intr, 1, __ATOMIC_RELAXED);
				continue;
			}
			stop_with(vc, VMM_STOP_KVM_ERROR, 0, errno);
			break;
		}
		io_exit = vc->run->exit_reason == KVM_EXIT_IO || vc->run->exit_reason == KVM_EXIT_MMIO;
		if (handle_exit(vc))
			break;
	}
	vmm_lifecycle_exited(vm);
	__atomic_sub_fetch(&vm->threads, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

int vmm_vcpu_start(struct vmm_vcpu *vc)
{
	pthread_once(&handler_once, install_handler);
	__atomic_add_fetch(&vc->vm->threads, 1, __ATOMIC_SEQ_CST);
	int r = pthread_create(&vc->thread, NULL, vcpu_main, vc);
	if (r) {
		__atomic_sub_fetch(&vc->vm->threads, 1, __ATOMIC_SEQ_CST);
		return -r;
	}
	STORE(&vc->started, 1);
	return 0;
}

void vmm_vcpu_join(struct vmm_vcpu *vc)
{
	if (!LOAD(&vc->started))
		return;
	pthread_join(vc->thread, NULL);
	STORE(&vc->started, 0);
}

/* ---- the public per-vCPU calls: the index and the VM's state are checked
 * here, x86.c does the work ---- */
int vmm_vcpu_set_boot_regs(struct vmm_vm *vm, int idx, const struct vmm_boot_regs *regs)
{
	if (idx < 0 || idx >= vm->nvcpus)
		return -EINVAL;
	int r = vmm_lifecycle_created(vm);
	return r ? r : vmm_x86_set_boot_regs(vm->vcpus[idx], regs);
}

int vmm_vcpu_get_regs(struct vmm_vm *vm, int idx, struct vmm_boot_regs *regs, uint32_t *mp_state)
{
	if (idx < 0 || idx >= vm->nvcpus)
		return -EINVAL;
	/* Only with the vCPU parked: a vCPU ioctl waits for KVM_RUN to return. */
	if (vmm_vm_state(vm) == VMM_VM_RUNNING)
		return -EBUSY;
	return vmm_x86_get_regs(vm->vcpus[idx], regs, mp_state);
}

int vmm_vcpu_save(struct vmm_vm *vm, int idx, struct vmm_vcpu_state *out)
{
	if (idx < 0 || idx >= vm->nvcpus)
		return -EINVAL;
	int r = vmm_lifecycle_paused(vm);
	return r ? r : vmm_x86_save_vcpu(vm->vcpus[idx], out);
}

int vmm_vcpu_restore(struct vmm_vm *vm, int idx, const struct vmm_vcpu_state *in)
{
	if (idx < 0 || idx >= vm->nvcpus)
		return -EINVAL;
	int r = vmm_lifecycle_created(vm);
	return r ? r : vmm_x86_restore_vcpu(vm->vcpus[idx], in, vm->tsc_advance_ns);
}
