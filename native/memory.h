/*
 * memory.h - guest physical memory: a few regions of host memory.
 *
 * Every guest-supplied address goes through vmm_mem_translate(), which
 * answers a host pointer only when [gpa, gpa + len) lies wholly inside one
 * region.  Devices never compute host pointers themselves.
 */
#ifndef VMM_MEMORY_H
#define VMM_MEMORY_H
#include "vmmcore.h"

#define VMM_MEM_MAX_REGIONS 8

struct vmm_mem_region {
	uint64_t gpa;
	uint64_t size;
	uint8_t *hva;
	int owned;		/* mapped by us: unmapped in vmm_mem_free */
	/* Pages the VMM itself wrote (devices), one bit each, while dirty
	 * tracking is on (else NULL); KVM logs the guest's own writes. */
	uint64_t *dirty;
};

struct vmm_mem {
	int n;
	struct vmm_mem_region r[VMM_MEM_MAX_REGIONS];
	/* Told when a guarded access found a page of this RAM gone (guard.h):
	 * the VM stops.  NULL without a VM (native tests). */
	void (*on_fault)(void *ctx, uint64_t gpa);
	void *fault_ctx;
};

/* Start recording device writes (a bitmap per region). */
int vmm_mem_track_dirty(struct vmm_mem *mem);
/* A device wrote [hva, hva+len) of guest RAM: remember the pages. */
void vmm_mem_mark_dirty(const struct vmm_mem *mem, const void *hva, uint64_t len);
/* OR into bits (words long) the pages devices wrote in region idx since the
 * last call, and forget them. */
void vmm_mem_take_dirty(struct vmm_mem *mem, int idx, uint64_t *bits, uint64_t words);
/* Host pointer for [gpa, gpa+len) inside one region, else NULL. */
void *vmm_mem_translate(const struct vmm_mem *mem, uint64_t gpa, uint64_t len);
const struct vmm_mem_region *vmm_mem_region_at(const struct vmm_mem *mem, int idx);
/* Unmap a region the core mapped itself (with its guard pages). */
void vmm_mem_unmap(const struct vmm_mem_region *r);
/* The region holding guest address gpa, or NULL. */
const struct vmm_mem_region *vmm_mem_region_of(const struct vmm_mem *mem, uint64_t gpa);
/* A guard caught a fault at host address hva of this RAM: tell on_fault.
 * Returns the guest physical address (or ~0 if hva is not guest RAM). */
uint64_t vmm_mem_fault(const struct vmm_mem *mem, const void *hva);

#endif
