/*
 * entry.S - entry points of the vmmd micro-guests.
 *
 *   pvh_entry   PVH (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging
 *               off, EBX = physical address of struct hvm_start_info.
 *   entry64     Linux 64-bit boot protocol (ELF e_entry): long mode, paging
 *               on with (at least) the first 1 GiB identity mapped, RSI =
 *               physical address of the zero page (struct boot_params).
 *
 * Both zero .bss, build their own identity page tables for 0-4 GiB with
 * 2 MiB pages (the 3-4 GiB MMIO hole uncached), load their own GDT and
 * stack, and call mg_start(boot_kind, boot_info) in rt.c.  Nothing of the
 * VMM's memory is used afterwards except the cmdline, which mg_start copies.
 *
 * The AP trampoline (mg=smp) is copied to MG_AP_TRAMP by the BSP; an AP goes
 * real -> protected -> long mode on the BSP's page tables, records its APIC
 * id in the mailbox, and halts with interrupts off.
 *
 * Only instructions KVM's x86 emulator handles are used (ring-0 code is
 * emulated on PVM hosts): no int3/int n, no cmpxchg16b, no SSE.
 */
#include "mg.h"

#define CR0_PE		0x00000001
#define CR0_PG		0x80000000
#define CR4_PAE		0x00000020
#define MSR_EFER	0xc0000080
#define EFER_LME	0x00000100

#define PTE_P		0x001
#define PTE_RW		0x002
#define PTE_PWT		0x008
#define PTE_PCD		0x010
#define PTE_PS		0x080
#define PD_FLAGS	(PTE_P | PTE_RW | PTE_PS)
#define PD_UC		(PTE_PWT | PTE_PCD)
#define PD_ENTRIES	2048		/* 4 GiB / 2 MiB */
#define PD_FIRST_UC	1536		/* 3 GiB / 2 MiB: the MMIO hole, uncached */

/* 32-bit protected mode -> long mode with CR3 = \pml4, then far jump to \target */
.macro ENTER_LONG32 pml4, target
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$\pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$(CR0_PG | CR0_PE), %eax
	movl	%eax, %cr0
	ljmp	$MG_CS64, $\target
.endm

	.section .text.head, "ax", @progbits

/* ------------------------------------------------------------------ */
/* Linux 64-bit boot protocol entry (e_entry of both flavours)          */
/* ------------------------------------------------------------------ */
	.code64
	.globl	entry64
	.type	entry64, @function
entry64:
	cli
	cld
	movq	%rsi, %r15			/* zero page */
	movl	$MG_BOOT_LINUX64, %r14d
	jmp	mg_setup64			/* the VMM's map covers our image */
	.size	entry64, . - entry64

/* ------------------------------------------------------------------ */
/* PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info    */
/* ------------------------------------------------------------------ */
	.code32
	.globl	pvh_entry
	.type	pvh_entry, @function
pvh_entry:
	cli
	cld
	movl	%ebx, %esi			/* start_info; survives into long mode */
	lgdt	mg_gdt_ptr			/* 32-bit form: limit + low 32 bits of base */
	movl	$MG_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	ljmp	$MG_CS32, $1f
1:
	/*
	 * Bootstrap map, just enough to reach mg_setup64: one self-referencing
	 * page used as PML4, PDPT and PD at once.  Entry 0 points to the page
	 * itself (PML4[0] -> PDPT, PDPT[0] -> PD), entry 1 is a 2 MiB page at
	 * 0x200000 (PD[1]), which holds the whole image (link.ld asserts it).
	 * Nothing else is touched before mg_setup64 switches to the real
	 * tables, so the other (uninitialised) entries never matter.
	 */
	movl	$(mg_boot_pt + PTE_P + PTE_RW), mg_boot_pt
	movl	$0, mg_boot_pt + 4
	movl	$(MG_LOAD_ADDR + PD_FLAGS), mg_boot_pt + 8
	movl	$0, mg_boot_pt + 12
	ENTER_LONG32 mg_boot_pt, pvh_long
	.code64
pvh_long:
	movl	%esi, %r15d			/* zero-extends: start_info address */
	movl	$MG_BOOT_PVH, %r14d
	jmp	mg_setup64
	.size	pvh_entry, . - pvh_entry

/*
 * Common 64-bit set-up.  R14D = boot kind, R15 = boot info address; the
 * current page tables (the VMM's or the bootstrap map) cover the image.
 * Zeroes .bss, builds the 0-4 GiB identity map (2 MiB pages, the 3-4 GiB
 * MMIO hole uncached), switches to it, loads our GDT and stack, calls
 * mg_start(kind, info).  The PD loop is unrolled: ring-0 code is emulated
 * instruction by instruction on PVM hosts, so instructions count.
 */
	.code64
mg_setup64:
	movq	$__bss_start, %rdi		/* .bss: C data, PML4, PDPT */
	movq	$__bss_end, %rcx
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	rep stosq

	movq	$(mg_pdpt + PTE_P + PTE_RW), %rax
	movq	%rax, mg_pml4
	movq	$(mg_pd + PTE_P + PTE_RW), %rax
	movq	%rax, mg_pdpt
	addq	$0x1000, %rax
	movq	%rax, mg_pdpt + 8
	addq	$0x1000, %rax
	movq	%rax, mg_pdpt + 16
	addq	$0x1000, %rax
	movq	%rax, mg_pdpt + 24

	/* PD: entry i = i * 2 MiB | flags; every PD slot is written */
	movq	$mg_pd, %rdi
	movq	$PD_FLAGS, %rax
	movl	$0x200000, %edx
	movl	$(PD_FIRST_UC / 8), %ecx
	movl	$2, %r8d			/* two runs: cached, then uncached */
2:	stosq
	addq	%rdx, %rax
	stosq
	addq	%rdx, %rax
	stosq
	addq	%rdx, %rax
	stosq
	addq	%rdx, %rax
	stosq
	addq	%rdx, %rax
	stosq
	addq	%rdx, %rax
	stosq
	addq	%rdx, %rax
	stosq
	addq	%rdx, %rax
	decl	%ecx
	jnz	2b
	orq	$PD_UC, %rax
	movl	$((PD_ENTRIES - PD_FIRST_UC) / 8), %ecx
	decl	%r8d
	jnz	2b

	movq	$mg_pml4, %rax
	movq	%rax, %cr3			/* identity: this code stays mapped */
	lgdt	mg_gdt_ptr
	movl	$MG_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movq	$mg_stack_top, %rsp		/* 16-byte aligned before the call */
	pushq	$MG_CS64
	pushq	$3f
	lretq					/* reload CS from our GDT */
3:	xorl	%ebp, %ebp
	movl	%r14d, %edi
	movq	%r15, %rsi
	call	mg_start
4:	cli
	hlt
	jmp	4b

/* ------------------------------------------------------------------ */
/* AP start-up (mg=smp)                                                 */
/* ------------------------------------------------------------------ */
/*
 * Real-mode part: copied to MG_AP_TRAMP (page aligned, below 1 MiB) and
 * entered at CS = MG_AP_TRAMP >> 4, IP = 0 by the start-up IPI.  Only this
 * blob is copied; it jumps to mg_ap_prot32 in the image.
 */
	.code16
	.balign	16
	.globl	mg_ap_tramp_start, mg_ap_tramp_end
mg_ap_tramp_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	mg_ap_gdtr - mg_ap_tramp_start	/* DS-relative: inside the copy */
	movl	%cr0, %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	$MG_CS32, $mg_ap_prot32
	.balign	4
mg_ap_gdtr:
	.word	mg_gdt_end - mg_gdt - 1
	.long	mg_gdt
mg_ap_tramp_end:

	.code32
mg_ap_prot32:
	movl	$MG_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	ENTER_LONG32 mg_pml4, mg_ap_long

	.code64
mg_ap_long:
	movl	$1, %eax
	xorl	%ecx, %ecx
	cpuid
	shrl	$24, %ebx			/* initial APIC id */
	movl	$1, %eax
	lock xaddl %eax, (MG_MAILBOX + MG_MB_AP_SLOT)
	cmpl	$MG_MAX_APS, %eax
	jae	6f
	movl	%ebx, (MG_MAILBOX + MG_MB_APIC_IDS)(, %rax, 4)
6:	lock incl (MG_MAILBOX + MG_MB_AP_DONE)	/* after the id store (x86 TSO) */
7:	cli
	hlt
	jmp	7b

/* ------------------------------------------------------------------ */
/* GDT (accessed bits preset, so the CPU never writes it)               */
/* ------------------------------------------------------------------ */
	.section .data, "aw", @progbits
	.balign	16
	.globl	mg_gdt
mg_gdt:
	.quad	0
	.quad	0x00af9b000000ffff		/* 0x08: 64-bit code, DPL 0 */
	.quad	0x00cf93000000ffff		/* 0x10: data, 4 GiB flat */
	.quad	0x00cf9b000000ffff		/* 0x18: 32-bit code, 4 GiB flat */
mg_gdt_end:
	.balign	8
	.word	0, 0, 0				/* pad so the 64-bit base is aligned */
mg_gdt_ptr:
	.word	mg_gdt_end - mg_gdt - 1
	.quad	mg_gdt

/* ------------------------------------------------------------------ */
/* page tables and stack                                                */
/* ------------------------------------------------------------------ */
	/* zeroed by mg_setup64 (partly written entries: the rest must be 0) */
	.section .bss, "aw", @nobits
	.balign	4096
	.globl	mg_pml4, mg_pdpt
mg_pml4:
	.skip	4096
mg_pdpt:
	.skip	4096

	/* not zeroed: fully written before use, or never read */
	.section .bss.noinit, "aw", @nobits
	.balign	4096
	.globl	mg_pd, mg_boot_pt, mg_stack_top
mg_pd:
	.skip	4096 * 4			/* 2048 x 2 MiB = 4 GiB */
mg_boot_pt:
	.skip	4096				/* PVH bootstrap map */
mg_stack:
	.skip	16384
mg_stack_top:

/* ------------------------------------------------------------------ */
/* PVH ELF note (microguest-pvh.elf only)                               */
/* ------------------------------------------------------------------ */
#ifdef MG_PVH
	.section .note.Xen, "a", @note
	.balign	4
	.long	4				/* namesz: "Xen\0" */
	.long	4				/* descsz: 32-bit entry address */
	.long	18				/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign	4
	.long	pvh_entry
	.balign	4
#endif

	.section .note.GNU-stack, "", @progbits
