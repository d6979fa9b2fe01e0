/*
 * floor.c - the bare floor of a KVM exit round trip on this host.
 *
 * One VM, one vCPU in real mode running "out dx, al; dec cx; jnz" forever
 * (or, with "mmio", a 32-bit store to 0x10000, past its RAM): every KVM_RUN
 * returns with KVM_EXIT_IO (KVM_EXIT_MMIO).  The micro-guest's mg=exits and
 * mg=mmio loops are the same three instructions an exit: on a PVM host, where
 * ring-0 guest code is emulated, each instruction shows in the round trip.
 * No irqchip, no devices, no threads: what is left is KVM_RUN itself, the exit
 * and the guest's three instructions.
 *
 * usage: floor N [port] [mmio]   (built and run by `python -m bench`)
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

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 100000;
	unsigned port = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 0x520;
	int mmio = argc > 3 && !strcmp(argv[3], "mmio");
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
