/*
 * lifecycle.c - a VM's run states and the park protocol: start (running, or
 * with every thread parked for a restore), pause, resume, stop; a stop
 * request from any thread, which wins once.
 *
 * Park protocol: a control thread sets pause_req, kicks the vCPUs and
 * wakes the I/O thread, then waits until `parked` counts every vCPU and the
 * I/O thread.  Each of them parks on park_cond in vmm_lifecycle_park() until
 * pause_req is cleared or stop_req set.  Both sides live here so the
 * counting stays in one place.
 */
#include <errno.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

#include "common.h"
#include "iothread.h"
#include "lifecycle.h"
#include "vcpu.h"

/* ---- state ---- */
int vmm_lifecycle_created(const struct vmm_vm *vm)
{
	return LOAD(&vm->state) == VMM_VM_CREATED ? 0 : -EBUSY;
}

int vmm_lifecycle_paused(const struct vmm_vm *vm)
{
	return vmm_vm_state(vm) == VMM_VM_PAUSED ? 0 : -EBUSY;
}

int vmm_vm_state(const struct vmm_vm *vm)
{
	/* A VM whose guest stopped it is STOPPED even before Python joins it. */
	if (LOAD(&vm->stop_reason))
		return VMM_VM_STOPPED;
	return LOAD(&vm->state);
}

int vmm_vm_stop_reason(const struct vmm_vm *vm)
{
	return LOAD(&vm->stop_reason);
}

/* ---- a VM's control locks ---- */
void vmm_lifecycle_init(struct vmm_vm *vm)
{
	pthread_mutex_init(&vm->ctl_lock, NULL);
	pthread_mutex_init(&vm->park_lock, NULL);
	/* CLOCK_MONOTONIC: wait_parked's deadline must not move with the wall clock. */
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&vm->park_cond, &ca);
	pthread_condattr_destroy(&ca);
}

void vmm_lifecycle_destroy(struct vmm_vm *vm)
{
	pthread_cond_destroy(&vm->park_cond);
	pthread_mutex_destroy(&vm->park_lock);
	pthread_mutex_destroy(&vm->ctl_lock);
}

/* ---- the park protocol, thread side ---- */
void vmm_lifecycle_park(struct vmm_vm *vm, const int *quit)
{
	pthread_mutex_lock(&vm->park_lock);
	vm->parked++;
	pthread_cond_broadcast(&vm->park_cond);
	while (LOAD(&vm->pause_req) && !LOAD(&vm->stop_req) && !(quit && LOAD(quit)))
		pthread_cond_wait(&vm->park_cond, &vm->park_lock);
	vm->parked--;
	pthread_mutex_unlock(&vm->park_lock);
}

void vmm_lifecycle_exited(struct vmm_vm *vm)
{
	pthread_mutex_lock(&vm->park_lock);
	vm->parked++;	/* an exited vCPU counts as parked for pause */
	pthread_cond_broadcast(&vm->park_cond);
	pthread_mutex_unlock(&vm->park_lock);
}

/* ---- the park protocol, control side ---- */
static int wait_parked(struct vmm_vm *vm, int timeout_ms)
{
	struct timespec dl;
	clock_gettime(CLOCK_MONOTONIC, &dl);
	dl.tv_sec += timeout_ms / 1000;
	dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (dl.tv_nsec >= 1000000000L) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000L;
	}
	int r = 0;
	pthread_mutex_lock(&vm->park_lock);
	/* Every vCPU and the I/O thread. */
	int want = vm->nvcpus + (vm->io ? 1 : 0);
	while (vm->parked < want && r == 0)
		r = pthread_cond_timedwait(&vm->park_cond, &vm->park_lock, &dl);
	int ok = vm->parked >= want;
	pthread_mutex_unlock(&vm->park_lock);
	return ok ? 0 : -ETIMEDOUT;
}

static void release_parked(struct vmm_vm *vm)
{
	pthread_mutex_lock(&vm->park_lock);
	STORE(&vm->pause_req, 0);
	pthread_cond_broadcast(&vm->park_cond);
	pthread_mutex_unlock(&vm->park_lock);
}

/* ---- stopping ---- */
void vmm_vm_kick_all(struct vmm_vm *vm)
{
	for (int i = 0; i < vm->nvcpus; i++)
		vmm_vcpu_kick(vm->vcpus[i]);
}

void vmm_vm_request_stop(struct vmm_vm *vm, int reason, const struct vmm_event *detail)
{
	int none = VMM_STOP_NONE;
	/* First reason wins; later ones (other vCPUs, the API) are no news. */
	if (__atomic_compare_exchange_n(&vm->stop_reason, &none, reason, 0,
					__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		vmm_events_push(&vm->events, detail);
	STORE(&vm->stop_req, 1);
	pthread_mutex_lock(&vm->park_lock);
	pthread_cond_broadcast(&vm->park_cond);
	pthread_mutex_unlock(&vm->park_lock);
	vmm_vm_kick_all(vm);
}

/* Join every thread; called with ctl_lock held. */
static void join_all(struct vmm_vm *vm)
{
	for (int i = 0; i < vm->nvcpus; i++)
		vmm_vcpu_join(vm->vcpus[i]);
	vmm_iothread_stop(vm->io);
	vm->io = NULL;
	vmm_console_flush(&vm->console);
}

/* ---- control operations, one at a time under ctl_lock ---- */
/* The I/O thread and the vCPU threads, running; called with ctl_lock held.
 * On failure the VM is stopped, with every thread that did start joined. */
static int run_threads(struct vmm_vm *vm)
{
	STORE(&vm->pause_req, 0);
	int r = vmm_iothread_start(vm, &vm->io);
	if (!r) {
		STORE(&vm->state, VMM_VM_RUNNING);
		for (int i = 0; i < vm->nvcpus && !r; i++)
			r = vmm_vcpu_start(vm->vcpus[i]);
		if (r) {
			struct vmm_event ev = { .type = VMM_EVENT_STOPPED,
						.reason = VMM_STOP_KVM_ERROR, .vcpu = -1, .err = -r };
			vmm_vm_request_stop(vm, VMM_STOP_KVM_ERROR, &ev);
			join_all(vm);
			STORE(&vm->state, VMM_VM_STOPPED);
		}
	}
	return r;
}

/* paused (a restored VM): PAUSED with no thread at all - they start with
 * the first resume.  A paused VM's threads would only park: making them now
 * (two thread starts and the park handshake, ~0.3 ms here) is left to the
 * resume, off a paused restore's path.  Nothing runs meanwhile: no vCPU, no
 * device, no watchdog - as with parked threads. */
static int start(struct vmm_vm *vm, int paused)
{
	pthread_mutex_lock(&vm->ctl_lock);
	int r = vmm_lifecycle_created(vm);
	if (!r && (vm->nvcpus == 0 || vm->mem->n == 0))
		r = -EINVAL;
	if (!r) {
		STORE(&vm->start_ns, vmm_now_ns());
		if (paused) {
			STORE(&vm->pause_req, 1);
			vm->threadless = 1;
			STORE(&vm->state, VMM_VM_PAUSED);
		} else {
			r = run_threads(vm);
		}
	}
	pthread_mutex_unlock(&vm->ctl_lock);
	return r;
}

int vmm_vm_start(struct vmm_vm *vm)
{
	return start(vm, 0);
}

int vmm_vm_start_paused(struct vmm_vm *vm)
{
	return start(vm, 1);
}

int vmm_vm_pause(struct vmm_vm *vm, int timeout_ms)
{
	pthread_mutex_lock(&vm->ctl_lock);
	int st = LOAD(&vm->state), r = 0;
	if (st == VMM_VM_RUNNING && !LOAD(&vm->stop_reason)) {
		STORE(&vm->pause_req, 1);
		vmm_vm_kick_all(vm);
		vmm_iothread_wake(vm->io);
		r = wait_parked(vm, timeout_ms);
		if (r == 0 && !LOAD(&vm->stop_reason)) {
			/* Tell a kvmclock guest it was stopped, not stuck (no soft-lockup
			 * reports after a long pause); EINVAL without kvmclock is fine. */
			for (int i = 0; i < vm->nvcpus; i++)
				ioctl(vm->vcpus[i]->fd, KVM_KVMCLOCK_CTRL, 0);
			STORE(&vm->state, VMM_VM_PAUSED);
			struct vmm_event ev = { .type = VMM_EVENT_PAUSED, .vcpu = -1 };
			vmm_events_push(&vm->events, &ev);
		} else if (r) {
			release_parked(vm);	/* no half-paused VM */
		}
	} else if (st != VMM_VM_PAUSED) {
		r = -EINVAL;
	}
	pthread_mutex_unlock(&vm->ctl_lock);
	return r;
}

int vmm_vm_resume(struct vmm_vm *vm)
{
	pthread_mutex_lock(&vm->ctl_lock);
	int st = LOAD(&vm->state), r = 0;
	if (st == VMM_VM_PAUSED && vm->threadless) {
		vm->threadless = 0;
		r = run_threads(vm);
		if (!r) {
			struct vmm_event ev = { .type = VMM_EVENT_RESUMED, .vcpu = -1 };
			vmm_events_push(&vm->events, &ev);
		}
	} else if (st == VMM_VM_PAUSED) {
		STORE(&vm->state, VMM_VM_RUNNING);
		release_parked(vm);
		struct vmm_event ev = { .type = VMM_EVENT_RESUMED, .vcpu = -1 };
		vmm_events_push(&vm->events, &ev);
	} else if (st != VMM_VM_RUNNING) {
		r = -EINVAL;
	}
	pthread_mutex_unlock(&vm->ctl_lock);
	return r;
}

int vmm_vm_stop(struct vmm_vm *vm)
{
	pthread_mutex_lock(&vm->ctl_lock);
	int st = LOAD(&vm->state);
	if (st == VMM_VM_RUNNING || st == VMM_VM_PAUSED) {
		struct vmm_event ev = { .type = VMM_EVENT_STOPPED,
					.reason = VMM_STOP_REQUESTED, .vcpu = -1 };
		vmm_vm_request_stop(vm, VMM_STOP_REQUESTED, &ev);
		join_all(vm);
	}
	STORE(&vm->state, VMM_VM_STOPPED);
	if (!LOAD(&vm->stop_reason))
		STORE(&vm->stop_reason, VMM_STOP_REQUESTED);
	pthread_mutex_unlock(&vm->ctl_lock);
	return 0;
}
