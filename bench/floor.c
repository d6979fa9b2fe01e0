/*
 * floor.c - the bare floor of a KVM exit round trip on this host.
 *
 * One VM, one vCPU in real mode running "out dx, al; dec cx; jnz" forever
 * (or, with "mmio", a 32-bit store to 0x10000, past its RAM): every KVM_RUN
 * returns with KVM_EXIT_IO (KVM_EXIT_MMIO).  The micro-guest's mg=exits and
 * mg=mmio loops are the same three instructions an exit: on a PVM host, where
 * ring-0 guest code is emulated, each instruction shows in the round trip.
 * No irqchip, no devices, no threads: what is left is KVM_RUN itself, the exit
 * and the guest's three instructions.  With "irqchip", the VM first gets the
 * in-kernel irqchip and PIT every vmmd VM has: what KVM_RUN itself costs more
 * with them, told apart from what vmmd's own loop adds.
 *
 * usage: floor N [port] [mmio|pio] [irqchip]   (built and run by `python -m bench`)
 *        floor machine N [PAUSE_US]  the KVM floor of CreateVm: N times the ioctls one
 *                                 of vmmd's VMs needs (see machine_once), timed alone
 *                                 and averaged: {"machine_ns": ...}; with PAUSE_US, after
 *                                 that long asleep each (as the bench's CreateVm comes)
 * prints one JSON line: create_vm_ns (KVM_CREATE_VM alone), exits, run_ns
 * (N KVM_RUN round trips after a warm-up) and exit_ns (run_ns / N).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#define MEM_SIZE 0x10000
#define CODE_ADDR 0x1000
#define WARMUP 1000

static void die(const char *what)
{
	fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define MMIO_ADDR 0x10000	/* ES = 0x1000, DI = 0: the first byte past RAM */

static void run_once(int vcpu, struct kvm_run *run, unsigned port, int mmio)
{
	if (ioctl(vcpu, KVM_RUN, 0) < 0)
		die("KVM_RUN");
	if (mmio ? run->exit_reason != KVM_EXIT_MMIO || run->mmio.phys_addr != MMIO_ADDR
		 : run->exit_reason != KVM_EXIT_IO || run->io.port != port) {
		fprintf(stderr, "floor: unexpected exit %u\n", run->exit_reason);
		exit(1);
	}
}

/* What vmmd's C core asks of KVM for one 1-vCPU, 128 MiB VM, in its order
 * (vm.c, x86.c), without any of its own work: the VM and its TSS and identity
 * map, the RAM slot, the irqchip and PIT, one vCPU with CPUID and registers.
 * The supported CPUID is read once before (as vmmd does).  Returns the time
 * it took; the close after it is not counted (KVM's teardown, ~20 ms here,
 * is off vmmd's request path too: vmm_vm_destroy_deferred). */
static int64_t machine_once(int kvm, int run_size, struct kvm_cpuid2 *cpuid, uint8_t *ram,
			    size_t ram_size)
{
	int64_t t0 = now_ns();
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint64_t idmap = 0xfffbc000;
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = ram_size,
		.userspace_addr = (uintptr_t)ram,
	};
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0 ||
	    ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0 ||
	    ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0 ||
	    ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0 || ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
		die("machine set-up");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	void *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct kvm_sregs sregs;
	struct kvm_regs regs = { .rflags = 2 };
	if (run == MAP_FAILED || ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0 ||
	    ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0 || ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0 ||
	    ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("vCPU set-up");
	int64_t took = now_ns() - t0;
	munmap(run, (size_t)run_size);
	close(vcpu);
	close(vm);
	return took;
}

static int machine(long n, long pause_us)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	size_t cpuid_size = sizeof(struct kvm_cpuid2) + 256 * sizeof(struct kvm_cpuid_entry2);
	struct kvm_cpuid2 *cpuid = calloc(1, cpuid_size);
	size_t ram_size = 128 << 20;
	uint8_t *ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (run_size < 0 || !cpuid || ram == MAP_FAILED)
		die("set-up");
	cpuid->nent = 256;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	machine_once(kvm, run_size, cpuid, ram, ram_size);	/* warm-up */
	int64_t total = 0;
	for (long i = 0; i < n; i++) {
		if (pause_us > 0)
			usleep((useconds_t)pause_us);
		total += machine_once(kvm, run_size, cpuid, ram, ram_size);
	}
	printf("{\"machines\": %ld, \"machine_ns\": %.1f}\n", n, n ? (double)total / (double)n : 0.0);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 2 && !strcmp(argv[1], "machine"))
		return machine(strtol(argv[2], NULL, 0), argc > 3 ? strtol(argv[3], NULL, 0) : 0);
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 100000;
	unsigned port = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 0x520;
	int mmio = argc > 3 && !strcmp(argv[3], "mmio");
	int irqchip = argc > 4 && !strcmp(argv[4], "irqchip");
	/* mov dx, port; 1: out dx, al; dec cx; jnz 1b; jmp 1b (when CX wraps) */
	uint8_t pio_code[] = { 0xba, port & 0xff, port >> 8, 0xee, 0x49, 0x75, 0xfc, 0xeb, 0xfa };
	/* 1: mov es:[di], eax; dec cx; jnz 1b; jmp 1b */
	uint8_t mmio_code[] = { 0x26, 0x66, 0x89, 0x05, 0x49, 0x75, 0xf9, 0xeb, 0xf7 };
	const uint8_t *code = mmio ? mmio_code : pio_code;
	size_t code_len = mmio ? sizeof(mmio_code) : sizeof(pio_code);

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int64_t t0 = now_ns();
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	int64_t create_vm_ns = now_ns() - t0;
	if (vm < 0)
		die("KVM_CREATE_VM");

	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	memcpy(mem + CODE_ADDR, code, code_len);
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (irqchip && (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0 || ioctl(vm, KVM_CREATE_PIT2, &pit) < 0))
		die("irqchip");

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
				   vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.es.base = MMIO_ADDR;
	sregs.es.selector = MMIO_ADDR >> 4;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = CODE_ADDR, .rflags = 2 };	/* DI = 0 */
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	for (int i = 0; i < WARMUP; i++)
		run_once(vcpu, run, port, mmio);
	t0 = now_ns();
	for (long i = 0; i < n; i++)
		run_once(vcpu, run, port, mmio);
	int64_t run_ns = now_ns() - t0;

	printf("{\"create_vm_ns\": %lld, \"exits\": %ld, \"run_ns\": %lld, \"exit_ns\": %.1f}\n",
	       (long long)create_vm_ns, n, (long long)run_ns, n ? (double)run_ns / (double)n : 0.0);
	return 0;
}
