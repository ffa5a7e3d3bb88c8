//! The CPL0 stub: from the PVH entry point to the Rust main at CPL3.
//!
//! On the nested, PVM-based KVM the guest runs on, every CPL0 instruction is
//! interpreted (1–3 µs each) and VEX-encoded instructions fail there, while
//! CPL3 code runs at native speed. So CPL0 does the least it can, all of it in
//! hand-written assembly that the compiler cannot fill with SSE/AVX:
//!
//! 1. PVH hands over in 32-bit protected mode, paging off, `%ebx` = physical
//!    address of `struct hvm_start_info`, no stack.
//! 2. Load our GDT and the page tables, which are assembled ready-made (identity
//!    map of the first 4 GiB in 2 MiB pages, user-accessible and writable, so no
//!    CPL0 loop fills them), enable PAE, SSE, long mode and paging, far-jump to
//!    64-bit code.
//! 3. Fill the fields that need link-time addresses split into bit fields
//!    (TSS descriptor base, IDT gate offsets), load TR and the IDT.
//! 4. `iretq` to CPL3 with IOPL 3 and IF = 0, on the user stack.
//! 5. At CPL3, clear `.bss` (the PVH loader copies only file contents) and call
//!    [`crate::baton_main`] with the start_info address.
//!
//! Exceptions (vectors 0–31) enter small CPL0 handlers on the TSS stack that
//! print `EXCEPTION vec=V err=0xE rip=0xR cs=0xC rsp=0xS cr2=0xA` on COM1 and
//! halt, except for three kinds of general protection fault (#GP) raised at
//! CPL3 on purpose:
//!
//! - `in`/`out` with the port in `%dx`: IOPL 3 lets CPL3 do port I/O on
//!   ordinary hardware and KVM, but the PVM-based KVM ignores the guest's IOPL
//!   and raises #GP. The handler performs the access at CPL0 and resumes after
//!   the instruction (about ten interpreted instructions). Software interrupts
//!   (`int n`) would be the obvious gate, but PVM turns them into #UD.
//! - `hlt`: the way CPL3 asks to halt for good (after a panic); the handler
//!   halts without printing anything.
//! - `sti` (interrupt mode, `virtio=irq`): PVM ignores IOPL here too; the
//!   handler sets IF in the interrupted code's RFLAGS.
//!
//! Vector 48 is the MSI vector of virtio devices in interrupt mode: its
//! handler counts the interrupt (`msi_count`) and writes the xAPIC EOI.
//!
//! The other processors (APs, started by [`crate::cpus`]) take a second way
//! in, about forty interpreted instructions each:
//!
//! 1. `ap_trampoline`, copied to a page below 1 MiB, runs in real mode at
//!    `CS = page >> 4`: it loads the boot GDT through a pointer of its own
//!    (DS = CS) and far-jumps to the GDT's 32-bit code segment with
//!    protection on.
//! 2. `ap_start32` enters long mode on the same page tables as step 2 above,
//!    with immediates only, since DS still holds its real-mode base.
//! 3. `ap_long_mode` reads its APIC ID from the xAPIC, finds its
//!    [`crate::cpus::CpuBlock`] in [`crate::cpus::AP_BLOCKS`] (or halts if it
//!    has none), loads the block's GDT (which holds the AP's own TSS) and TR,
//!    shares the IDT, and `iretq`s to CPL3 on the block's user stack in
//!    [`crate::cpus::ap_main`], with its CPU index.

use core::arch::global_asm;

/// Halts this CPU for good, with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `hlt` at CPL3 raises #GP, which the entry stub's handler
        // answers by halting at CPL0; it touches no Rust-visible memory.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}

global_asm!(
    r#"
    .set KERNEL_CS, 0x08
    .set KERNEL_DS, 0x10
    .set USER_DS, 0x18
    .set USER_CS, 0x20
    .set TSS_SEL, 0x28
    /* 32-bit code, for the APs' way from real mode. */
    .set KERNEL_CS32, 0x38

    .set CR0_PE, 1 << 0
    .set CR0_MP, 1 << 1
    .set CR0_ET, 1 << 4
    .set CR0_NE, 1 << 5
    .set CR0_PG, 1 << 31
    .set CR4_PAE, 1 << 5
    .set CR4_OSFXSR, 1 << 9
    .set CR4_OSXMMEXCPT, 1 << 10
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 1 << 8

    /* Present, writable, user-accessible, 2 MiB page. */
    .set PAGE_RAM, 0x87
    /* The same, uncached: the top GiB holds device MMIO (LAPIC, IOAPIC, PCI). */
    .set PAGE_MMIO, 0x9f
    /* Present, writable, user-accessible table pointer. */
    .set TABLE, 0x07

    /* IOPL 3 so CPL3 may do port I/O; IF = 0; bit 1 is always set. */
    .set USER_RFLAGS, (3 << 12) | (1 << 1)

    .set COM1, 0x3f8
    .set COM1_LSR, COM1 + 5
    .set LSR_THR_EMPTY, 0x20

    .set STUB_SIZE, 16
    /* The xAPIC ID register (ID in bits 31:24). */
    .set LAPIC_ID, 0xfee00020
    /* The vector virtio MSI-X messages carry; see crate::irq. */
    .set MSI_VECTOR, 48

    /* ---- PVH entry: 32-bit protected mode, paging off ---- */
    .pushsection .text.pvh_entry, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    /* %ebx (start_info) is left alone until the Rust main is called. */
    lgdt gdt_ptr
    movl $pml4, %eax
    movl %eax, %cr3
    movl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    /* EM and TS clear, MP set: SSE usable without faults. */
    movl $(CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $KERNEL_CS, $long_mode

    .code64
long_mode:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movq $kstack_top, %rsp

    /* The TSS base is split over the descriptor; the image is below 4 GiB. */
    movl $tss, %eax
    movw %ax, gdt_tss + 2
    shrl $16, %eax
    movb %al, gdt_tss + 4
    movb %ah, gdt_tss + 7
    movw $TSS_SEL, %ax
    ltr %ax

    /* Gate selectors and types are assembled; only offsets are filled. */
    movl $idt, %esi
    movl $exception_stubs, %eax
    movl $32, %ecx
.Lfill_idt:
    movw %ax, (%rsi)
    movl %eax, %edx
    shrl $16, %edx
    movw %dx, 6(%rsi)
    addl $STUB_SIZE, %eax
    addq $16, %rsi
    decl %ecx
    jnz .Lfill_idt
    /* The MSI vector (see msi_handler). */
    movl $msi_handler, %eax
    movl $(idt + MSI_VECTOR * 16), %esi
    movw %ax, (%rsi)
    shrl $16, %eax
    movw %ax, 6(%rsi)
    lidt idt_ptr

    pushq $(USER_DS | 3)
    pushq $ustack_top
    pushq $USER_RFLAGS
    pushq $(USER_CS | 3)
    pushq $user_start
    iretq

    /* ---- CPL3 from here on: native speed ---- */
user_start:
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl %ebx, %edi
    call {main}
    ud2

    /* ---- AP entry, from ap_trampoline: 32-bit protected mode, paging off ---- */
    .code32
ap_start32:
    /* DS still has the trampoline's real-mode base: immediates only. */
    movl $pml4, %eax
    movl %eax, %cr3
    movl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $(CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $KERNEL_CS, $ap_long_mode

    .code64
ap_long_mode:
    movl $LAPIC_ID, %eax
    movl (%rax), %eax
    shrl $24, %eax
    movq {ap_blocks}(,%rax,8), %rbx
    testq %rbx, %rbx
    jz halt_forever_cpl0
    /* The block's GDT has the same segments, and this AP's own TSS. */
    lgdt {block_gdt_ptr}(%rbx)
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movw $TSS_SEL, %ax
    ltr %ax
    lidt idt_ptr
    movq {block_rsp0}(%rbx), %rsp
    movq {block_index}(%rbx), %rdi
    pushq $(USER_DS | 3)
    pushq {block_user_rsp}(%rbx)
    pushq $USER_RFLAGS
    pushq $(USER_CS | 3)
    pushq $ap_user_start
    iretq

ap_user_start:
    call {ap_main}
    ud2

    /* ---- CPL0 exception handlers ---- */
    .balign STUB_SIZE
exception_stubs:
    .set vec, 0
    .rept 32
    .balign STUB_SIZE
    .if vec == 13
    jmp gp_handler
    .else
    /* Vectors that push no error code get a zero one, for one frame layout. */
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp exception_common
    .endif
    .set vec, vec + 1
    .endr

    /*
     * #GP. Stack: error code, rip, cs, rflags, rsp, ss. Port I/O and `hlt`
     * from CPL3 are served (see the module doc); the I/O instructions use the
     * interrupted %dx and %al/%ax/%eax, which the handler leaves live. Most
     * frequent first: `in al, dx` is the UART status poll.
     */
gp_handler:
    testb $3, 16(%rsp)
    jz .Lgp_fault
    pushq %rsi
    movq 16(%rsp), %rsi
    cmpb $0xec, (%rsi)
    je .Lgp_inb
    cmpb $0xee, (%rsi)
    je .Lgp_outb
    cmpb $0xf4, (%rsi)
    je halt_forever_cpl0
    cmpb $0xfb, (%rsi)
    je .Lgp_sti
    cmpb $0xed, (%rsi)
    je .Lgp_inl
    cmpb $0xef, (%rsi)
    je .Lgp_outl
    cmpw $0xed66, (%rsi)
    je .Lgp_inw
    cmpw $0xef66, (%rsi)
    je .Lgp_outw
    popq %rsi
.Lgp_fault:
    pushq $13
    jmp exception_common
.Lgp_inb:
    inb %dx, %al
    jmp .Lgp_done1
.Lgp_sti:
    /* Interrupts on for the interrupted code: IF in its saved RFLAGS. */
    orq $0x200, 32(%rsp)
    jmp .Lgp_done1
.Lgp_outb:
    outb %al, %dx
    jmp .Lgp_done1
.Lgp_inl:
    inl %dx, %eax
    jmp .Lgp_done1
.Lgp_outl:
    outl %eax, %dx
    jmp .Lgp_done1
.Lgp_inw:
    inw %dx, %ax
    jmp .Lgp_done2
.Lgp_outw:
    outw %ax, %dx
.Lgp_done2:
    incq 16(%rsp)
.Lgp_done1:
    incq 16(%rsp)
    popq %rsi
    addq $8, %rsp
    iretq

    /*
     * An MSI from a virtio device: count it and end the interrupt at the
     * local APIC (xAPIC EOI register). A handful of instructions, because KVM
     * interprets CPL0 code on the hosts the tests run on.
     */
msi_handler:
    lock incq msi_count
    pushq %rax
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    /* Stack: vector, error code, then the CPU's frame: rip, cs, rflags, rsp, ss. */
exception_common:
    movq $msg_exception, %rsi
    call exc_puts
    movq (%rsp), %rax
    call exc_putdec
    movq $msg_err, %rsi
    call exc_puts
    movq 8(%rsp), %rbx
    call exc_puthex
    movq $msg_rip, %rsi
    call exc_puts
    movq 16(%rsp), %rbx
    call exc_puthex
    movq $msg_cs, %rsi
    call exc_puts
    movq 24(%rsp), %rbx
    call exc_puthex
    movq $msg_rsp, %rsi
    call exc_puts
    movq 40(%rsp), %rbx
    call exc_puthex
    movq $msg_cr2, %rsi
    call exc_puts
    movq %cr2, %rbx
    call exc_puthex
    movq $msg_eol, %rsi
    call exc_puts
halt_forever_cpl0:
    cli
    hlt
    jmp halt_forever_cpl0

    /* Writes %cl to COM1 once the transmitter is empty; clobbers %eax, %edx. */
exc_putc:
    movl $COM1_LSR, %edx
.Lputc_wait:
    inb %dx, %al
    testb $LSR_THR_EMPTY, %al
    jz .Lputc_wait
    movl $COM1, %edx
    movb %cl, %al
    outb %al, %dx
    ret

    /* Writes the NUL-terminated string at %rsi; clobbers %rsi, %eax, %ecx, %edx. */
exc_puts:
    movzbl (%rsi), %ecx
    testb %cl, %cl
    jz .Lputs_done
    call exc_putc
    incq %rsi
    jmp exc_puts
.Lputs_done:
    ret

    /* Writes %eax (< 100) in decimal; clobbers %eax, %ecx, %edx, %r8d. */
exc_putdec:
    xorl %edx, %edx
    movl $10, %ecx
    divl %ecx
    movl %edx, %r8d
    testl %eax, %eax
    jz .Lputdec_ones
    leal 0x30(%eax), %ecx       /* 0x30 = ASCII 0 */
    call exc_putc
.Lputdec_ones:
    leal 0x30(%r8d), %ecx       /* 0x30 = ASCII 0 */
    call exc_putc
    ret

    /* Writes %rbx in hex without leading zeros; clobbers %rbx, %eax, %ecx, %edx, %r8d, %r9d. */
exc_puthex:
    movl $16, %r8d
    xorl %r9d, %r9d
.Lputhex_digit:
    rolq $4, %rbx
    movl %ebx, %ecx
    andl $0xf, %ecx
    orl %ecx, %r9d
    cmpl $1, %r8d
    je .Lputhex_print
    testl %r9d, %r9d
    jz .Lputhex_next
.Lputhex_print:
    movzbl hex_digits(%rcx), %ecx
    call exc_putc
.Lputhex_next:
    decl %r8d
    jnz .Lputhex_digit
    ret
    .popsection

    .pushsection .rodata.pvh_strings, "a"
hex_digits:
    .ascii "0123456789abcdef"
msg_exception:
    .asciz "EXCEPTION vec="
msg_err:
    .asciz " err=0x"
msg_rip:
    .asciz " rip=0x"
msg_cs:
    .asciz " cs=0x"
msg_rsp:
    .asciz " rsp=0x"
msg_cr2:
    .asciz " cr2=0x"
msg_eol:
    .asciz "\r\n"
    .popsection

    /*
     * ---- AP trampoline: copied to a page below 1 MiB, entered in real mode
     * at CS:0 by a STARTUP IPI ----
     */
    .pushsection .rodata.ap_trampoline, "a"
    .code16
    .balign 16
    .globl ap_trampoline
ap_trampoline:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_trampoline_gdt_ptr - ap_trampoline
    /* PE alone: this also clears the CD and NW bits that INIT leaves set. */
    movl $CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $KERNEL_CS32, $ap_start32
    .balign 8
ap_trampoline_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl ap_trampoline_end
ap_trampoline_end:
    .code64
    .popsection

    /* ---- PVH note: the 32-bit physical entry point ---- */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz: QEMU reads a 64-bit value */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .long 0
    .popsection

    /* ---- CPU tables (in .data: .bss is cleared after they are filled) ---- */
    .pushsection .data.pvh_tables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + TABLE
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + TABLE
    .quad pd + 0x1000 + TABLE
    .quad pd + 0x2000 + TABLE
    .quad pd + 0x3000 + TABLE
    .fill 508, 8, 0
pd:
    .set addr, 0
    .rept 3 * 512
    .quad addr | PAGE_RAM
    .set addr, addr + 0x200000
    .endr
    .rept 512
    .quad addr | PAGE_MMIO
    .set addr, addr + 0x200000
    .endr

    /*
     * Accessed bits preset so the CPU never writes the GDT (APs copy the
     * first five entries: see crate::cpus).
     */
    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* KERNEL_CS: 64-bit code, DPL 0 */
    .quad 0x00cf93000000ffff    /* KERNEL_DS */
    .quad 0x00cff3000000ffff    /* USER_DS: DPL 3 */
    .quad 0x00affb000000ffff    /* USER_CS: 64-bit code, DPL 3 */
gdt_tss:
    .word 0x67, 0               /* limit; base 15:0 filled at boot */
    .byte 0, 0x89, 0, 0         /* base 23:16; available 64-bit TSS; base 31:24 */
    .long 0, 0                  /* base 63:32; reserved */
    .quad 0x00cf9b000000ffff    /* KERNEL_CS32: 32-bit code, DPL 0 */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 16
tss:
    .long 0
    .quad kstack_top            /* RSP0: stack for exceptions from CPL3 */
    .fill 11, 8, 0              /* RSP1, RSP2, reserved, IST1-7, reserved */
    .word 0
    .word 104                   /* I/O bitmap beyond the limit: IOPL alone decides */

    .balign 16
idt:
    .rept 32
    .word 0, KERNEL_CS, 0x8e00, 0   /* interrupt gate, DPL 0 */
    .quad 0
    .endr
    .fill (MSI_VECTOR - 32) * 2, 8, 0   /* not present */
    .word 0, KERNEL_CS, 0x8e00, 0   /* the MSI vector */
    .quad 0
idt_end:

    .balign 8
    .globl msi_count
msi_count:
    .quad 0
idt_ptr:
    .word idt_end - idt - 1
    .quad idt
    .popsection

    .pushsection .stacks, "aw", @nobits
    .balign 4096
    /* Below the user stack, so a user stack overflow spoils only this. */
    .skip 16384
kstack_top:
    .skip 262144
ustack_top:
    .popsection
"#,
    main = sym crate::baton_main,
    ap_main = sym crate::cpus::ap_main,
    ap_blocks = sym crate::cpus::AP_BLOCKS,
    block_gdt_ptr = const crate::cpus::BLOCK_GDT_PTR,
    block_rsp0 = const crate::cpus::BLOCK_RSP0,
    block_user_rsp = const crate::cpus::BLOCK_USER_RSP,
    block_index = const crate::cpus::BLOCK_INDEX,
    options(att_syntax)
);
