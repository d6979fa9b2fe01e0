/*
 * memory.c - guest RAM regions and bounds-checked access to them.
 * vmm_mem_read/write (Python, a vCPU fetching an instruction) run under a
 * guard: RAM whose file shrank fails them with -EFAULT and stops the VM.
 */
#define _GNU_SOURCE	/* SEEK_DATA, SEEK_HOLE */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "guard.h"
#include "memory.h"

struct vmm_mem *vmm_mem_new(void)
{
	vmm_guard_init();	/* before any guest RAM exists */
	return calloc(1, sizeof(struct vmm_mem));
}

#define GUARD 4096ull

void vmm_mem_unmap(const struct vmm_mem_region *r)
{
	if (r->owned)
		munmap(r->hva - GUARD, r->size + 2 * GUARD);
	free(r->dirty);
}

void vmm_mem_free(struct vmm_mem *mem)
{
	if (!mem)
		return;
	for (int i = 0; i < mem->n; i++)
		vmm_mem_unmap(&mem->r[i]);
	free(mem);
}

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

static int check_new_region(const struct vmm_mem *mem, uint64_t gpa, uint64_t size)
{
	if (!mem || size == 0 || (gpa & 0xfff) || (size & 0xfff))
		return -EINVAL;
	if (gpa + size < gpa)
		return -EOVERFLOW;
	if (mem->n == VMM_MEM_MAX_REGIONS)
		return -ENOSPC;
	for (int i = 0; i < mem->n; i++)
		if (overlaps(gpa, size, mem->r[i].gpa, mem->r[i].size))
			return -EEXIST;
	return 0;
}

/* NORESERVE: a 4 GiB guest costs nothing until it touches it.  A PROT_NONE
 * page on each side: a device bug that overruns guest RAM faults at once
 * instead of touching the daemon's memory.  fd < 0: anonymous memory. */
static uint8_t *map_guarded(uint64_t size, int fd, uint64_t offset, int *err)
{
	uint8_t *map = mmap(NULL, size + 2 * GUARD, PROT_NONE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (map == MAP_FAILED) {
		*err = -errno;
		return NULL;
	}
	void *ram = fd < 0 ? (mprotect(map + GUARD, size, PROT_READ | PROT_WRITE) < 0 ?
			      MAP_FAILED : map + GUARD)
		    : mmap(map + GUARD, size, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, (off_t)offset);
	if (ram == MAP_FAILED) {
		*err = -errno;
		munmap(map, size + 2 * GUARD);
		return NULL;
	}
	return map + GUARD;
}

int vmm_mem_add_region(struct vmm_mem *mem, uint64_t gpa, uint64_t size, void *hva)
{
	int r = check_new_region(mem, gpa, size), owned = 0;
	if (r)
		return r;
	if (!hva) {
		hva = map_guarded(size, -1, 0, &r);
		if (!hva)
			return r;
		owned = 1;
	}
	mem->r[mem->n++] = (struct vmm_mem_region){
		.gpa = gpa, .size = size, .hva = hva, .owned = owned };
	return 0;
}

int vmm_mem_add_file_region(struct vmm_mem *mem, uint64_t gpa, uint64_t size, int fd,
			    uint64_t offset)
{
	struct stat st;
	int r = check_new_region(mem, gpa, size);
	if (r)
		return r;
	/* Pages past the end of the file would SIGBUS whoever touches them. */
	if (fstat(fd, &st) < 0)
		return -errno;
	if ((offset & 0xfff) || offset + size < offset || (uint64_t)st.st_size < offset + size)
		return -EINVAL;
	uint8_t *hva = map_guarded(size, fd, offset, &r);
	if (!hva)
		return r;
	mem->r[mem->n++] = (struct vmm_mem_region){ .gpa = gpa, .size = size, .hva = hva,
						    .owned = 1 };
	return 0;
}

int vmm_mem_track_dirty(struct vmm_mem *mem)
{
	for (int i = 0; i < mem->n; i++) {
		struct vmm_mem_region *r = &mem->r[i];
		if (!r->dirty && !(r->dirty = calloc((r->size / 4096 + 63) / 64, 8)))
			return -ENOMEM;
	}
	return 0;
}

void vmm_mem_mark_dirty(const struct vmm_mem *mem, const void *hva, uint64_t len)
{
	const uint8_t *p = hva;
	for (int i = 0; i < mem->n && len; i++) {
		const struct vmm_mem_region *r = &mem->r[i];
		if (!r->dirty || p < r->hva || p >= r->hva + r->size)
			continue;
		uint64_t off = (uint64_t)(p - r->hva);
		uint64_t last = (off + len - 1 < r->size ? off + len - 1 : r->size - 1) / 4096;
		for (uint64_t pg = off / 4096; pg <= last; pg++)
			__atomic_fetch_or(&r->dirty[pg / 64], 1ull << (pg % 64), __ATOMIC_RELAXED);
		return;
	}
}

void vmm_mem_take_dirty(struct vmm_mem *mem, int idx, uint64_t *bits, uint64_t words)
{
	struct vmm_mem_region *r = &mem->r[idx];
	for (uint64_t w = 0; w < words; w++)
		bits[w] |= __atomic_exchange_n(&r->dirty[w], 0, __ATOMIC_RELAXED);
}

void *vmm_mem_translate(const struct vmm_mem *mem, uint64_t gpa, uint64_t len)
{
	for (int i = 0; i < mem->n; i++) {
		const struct vmm_mem_region *r = &mem->r[i];
		/* Written so that no sum can overflow: gpa and len are guest-controlled. */
		if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
			return r->hva + (gpa - r->gpa);
	}
	return NULL;
}

const struct vmm_mem_region *vmm_mem_region_at(const struct vmm_mem *mem, int idx)
{
	return (idx >= 0 && idx < mem->n) ? &mem->r[idx] : NULL;
}

const struct vmm_mem_region *vmm_mem_region_of(const struct vmm_mem *mem, uint64_t gpa)
{
	for (int i = 0; i < mem->n; i++)
		if (gpa >= mem->r[i].gpa && gpa - mem->r[i].gpa < mem->r[i].size)
			return &mem->r[i];
	return NULL;
}

uint64_t vmm_mem_fault(const struct vmm_mem *mem, const void *hva)
{
	const uint8_t *p = hva;
	uint64_t gpa = ~0ull;
	for (int i = 0; i < mem->n; i++)
		if (p >= mem->r[i].hva && p < mem->r[i].hva + mem->r[i].size)
			gpa = mem->r[i].gpa + (uint64_t)(p - mem->r[i].hva);
	if (mem->on_fault)
		mem->on_fault(mem->fault_ctx, gpa);
	return gpa;
}

/* Copies may span adjacent regions; each piece is checked on its own. */
static int mem_copy(const struct vmm_mem *mem, uint64_t gpa, uint8_t *buf,
		    uint64_t len, int to_guest)
{
	while (len) {
		const struct vmm_mem_region *r = vmm_mem_region_of(mem, gpa);
		if (!r)
			return -EFAULT;
		uint64_t off = gpa - r->gpa;
		uint64_t n = r->size - off < len ? r->size - off : len;
		if (to_guest)
			memcpy(r->hva + off, buf, n);
		else
			memcpy(buf, r->hva + off, n);
		gpa += n;
		buf += n;
		len -= n;
	}
	return 0;
}

static int guarded_copy(const struct vmm_mem *mem, uint64_t gpa, uint8_t *buf,
			uint64_t len, int to_guest)
{
	struct vmm_guard g;
	int r;
	if (gpa + len < gpa)
		return -EFAULT;
	if (VMM_GUARD_ENTER(&g, mem) == 0) {
		r = mem_copy(mem, gpa, buf, len, to_guest);
	} else {
		vmm_mem_fault(mem, g.fault_addr);
		r = -EFAULT;
	}
	vmm_guard_leave(&g);
	return r;
}

int vmm_mem_read(const struct vmm_mem *mem, uint64_t gpa, void *buf, uint64_t len)
{
	return guarded_copy(mem, gpa, buf, len, 0);
}

int vmm_mem_write(struct vmm_mem *mem, uint64_t gpa, const void *buf, uint64_t len)
{
	return guarded_copy(mem, gpa, (uint8_t *)buf, len, 1);
}

int vmm_mem_region_count(const struct vmm_mem *mem)
{
	return mem->n;
}

int vmm_mem_region_get(const struct vmm_mem *mem, int idx, uint64_t *gpa, uint64_t *size)
{
	const struct vmm_mem_region *r = vmm_mem_region_at(mem, idx);
	if (!r)
		return -ENOENT;
	*gpa = r->gpa;
	*size = r->size;
	return 0;
}

/* Read [offset, offset + len) of fd into guest RAM at gpa, a piece per
 * region; only the file's data extents are read (SEEK_DATA/SEEK_HOLE): RAM
 * is zero already, so a sparse initrd costs its data, not its size.  A file
 * that ends early is -ENODATA. */
int64_t vmm_mem_load_fd(struct vmm_mem *mem, uint64_t gpa, int fd, uint64_t offset, uint64_t len)
{
	if (gpa + len < gpa || offset + len < offset || (int64_t)(offset + len) < 0)
		return -EINVAL;
	for (uint64_t g = gpa, left = len; left;) {	/* all of it RAM, holes too */
		const struct vmm_mem_region *r = vmm_mem_region_of(mem, g);
		if (!r)
			return -EFAULT;
		uint64_t n = r->size - (g - r->gpa) < left ? r->size - (g - r->gpa) : left;
		g += n;
		left -= n;
	}
	uint64_t end = offset + len, pos = offset, loaded = 0;
	while (pos < end) {
		off_t data = lseek(fd, (off_t)pos, SEEK_DATA);
		if (data < 0 && errno == ENXIO)
			break;		/* only a hole (or nothing) left */
		if (data < 0)
			data = (off_t)pos;	/* no SEEK_DATA here: read it all */
		if ((uint64_t)data >= end)
			break;
		off_t hole = lseek(fd, data, SEEK_HOLE);
		uint64_t stop = hole < 0 || (uint64_t)hole > end ? end : (uint64_t)hole;
		for (uint64_t at = (uint64_t)data; at < stop;) {
			uint64_t g = gpa + (at - offset);
			const struct vmm_mem_region *r = vmm_mem_region_of(mem, g);
			if (!r)
				return -EFAULT;
			uint64_t room = r->size - (g - r->gpa), want = stop - at;
			ssize_t n = pread(fd, r->hva + (g - r->gpa), want < room ? want : room,
					  (off_t)at);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				return -errno;
			if (n == 0)
				return -ENODATA;
			at += (uint64_t)n;
			loaded += (uint64_t)n;
		}
		pos = stop;
	}
	struct stat st;
	if (fstat(fd, &st) < 0)
		return -errno;
	return (uint64_t)st.st_size < end ? -ENODATA : (int64_t)loaded;
}
