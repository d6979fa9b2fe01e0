/*
 * lifecycle.h - a VM's run states (enum vmm_vm_state) and the park
 * protocol; the public operations (vmm_vm_start, _pause, _resume, _stop,
 * _state) are in vmmcore.h.  What the rest of the core needs of it:
 * whether the VM may be built or saved now, a way for its threads to park
 * and to leave, and a stop request from any thread.
 */
#ifndef VMM_LIFECYCLE_H
#define VMM_LIFECYCLE_H
#include "vm.h"

/* The locks and the condition variable of a new VM, and their end. */
void vmm_lifecycle_init(struct vmm_vm *vm);
void vmm_lifecycle_destroy(struct vmm_vm *vm);

/* 0 if the VM was created and never started, else -EBUSY: adding RAM,
 * vCPUs, devices and restoring state need it. */
int vmm_lifecycle_created(const struct vmm_vm *vm);
/* 0 if the VM is paused (every thread parked, not stopped), else -EBUSY:
 * saving state needs it. */
int vmm_lifecycle_paused(const struct vmm_vm *vm);

/* A vCPU or the I/O thread saw pause_req: count itself parked and wait
 * until the VM resumes or stops (or *quit, when quit is not NULL). */
void vmm_lifecycle_park(struct vmm_vm *vm, const int *quit);
/* A vCPU thread ends: it counts as parked from now on, so a pause never
 * waits for it. */
void vmm_lifecycle_exited(struct vmm_vm *vm);

/* Any thread: the VM must stop for `reason`; the first reason wins and
 * posts one STOPPED event (detail). */
void vmm_vm_request_stop(struct vmm_vm *vm, int reason, const struct vmm_event *detail);
void vmm_vm_kick_all(struct vmm_vm *vm);

#endif
