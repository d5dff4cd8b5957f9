/* Entry paths of the probe guest: Linux's 64-bit boot protocol (_start64, %rsi = zero page),
 * PVH (_start_pvh, 32-bit, %ebx = hvm_start_info) and application processors (real mode at
 * 0x10000 after SIPI). All three end in long mode on the probe's own GDT and a 4 GiB identity
 * map, which also covers the LAPIC, IOAPIC and boot-marker MMIO addresses. */

#define MODE_LINUX64 0
#define MODE_PVH     1
#define MODE_AP      2

    .section .text.entry, "ax"
    .code64
    .globl _start64
_start64:
    cli
    movq %rsi, %rbx
    movl $MODE_LINUX64, %edi
    lgdt gdt_pointer(%rip)
    pushq $0x18
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  movq $pml4, %rax
    movq %rax, %cr3
    jmp long_common

    .code32
    .globl _start_pvh
_start_pvh:
    cli
    movl $MODE_PVH, %edi
    lgdt gdt_pointer
    ljmp $0x08, $1f
1:  jmp enter_long_mode

    /* From 32-bit protected mode with paging off: PAE, our page tables, EFER.LME, then paging. */
    .globl enter_long_mode
enter_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $0x18, $long_common

    .code64
long_common:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    cmpl $MODE_AP, %edi
    je 2f
    leaq bsp_stack_top(%rip), %rsp
    movq %rbx, %rsi
    call probe_main
    jmp halt_forever
2:  movl $1, %eax
    lock xaddl %eax, ap_next_index(%rip)
    movl %eax, %edi
    movl %eax, %ecx
    incl %ecx
    shll $12, %ecx
    leaq ap_stacks(%rip), %rsp
    addq %rcx, %rsp
    call ap_main
halt_forever:
    cli
    hlt
    jmp halt_forever

    /* Ring-3 entry: iretq to fn(arg) at CPL 3 with IOPL 3, so it may use in/out directly. */
    .globl enter_user_mode
enter_user_mode:
    /* A TSS whose I/O bitmap allows every port: some KVM backends consult it even at IOPL 3. */
    leaq tss(%rip), %rax
    movw %ax, gdt_tss + 2(%rip)
    shrq $16, %rax
    movb %al, gdt_tss + 4(%rip)
    movb %ah, gdt_tss + 7(%rip)
    shrq $16, %rax
    movl %eax, gdt_tss + 8(%rip)
    movw $0x30, %ax
    ltr %ax
    movq %rsi, %rax
    pushq $0x23              /* SS: user data, RPL 3 */
    leaq user_stack_top(%rip), %rcx
    pushq %rcx
    pushq $0x3002            /* RFLAGS: IOPL=3, IF=0 */
    pushq $0x2b              /* CS: user code64, RPL 3 */
    pushq %rdi
    movq %rax, %rdi
    iretq

    /* Application processor trampoline, linked at 0x10000, entered in real mode with CS=0x1000. */
    .section .trampoline, "ax"
    .code16
    .globl ap_trampoline
ap_trampoline:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_pointer - ap_trampoline)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_protected
    .code32
ap_protected:
    movl $MODE_AP, %edi
    jmp enter_long_mode
    .balign 8
ap_gdt_pointer:
    .word gdt_end - gdt - 1
    .long gdt

    .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff     /* 0x08 code32 */
    .quad 0x00cf92000000ffff     /* 0x10 data */
    .quad 0x00af9a000000ffff     /* 0x18 code64 */
    .quad 0x00cff2000000ffff     /* 0x20 user data (DPL 3) */
    .quad 0x00affa000000ffff     /* 0x28 user code64 (DPL 3) */
gdt_tss:                         /* 0x30 64-bit TSS, base filled in at run time */
    .word tss_end - tss - 1
    .word 0
    .byte 0, 0x89, 0, 0
    .long 0, 0
gdt_end:
    .balign 8
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 16
tss:
    .long 0
    .quad bsp_stack_top           /* rsp0 */
    .fill 88, 1, 0
    .word 0
    .word tss_iomap - tss         /* I/O map base */
tss_iomap:
    .fill 8192, 1, 0
    .byte 0xff
tss_end:

    .globl ap_next_index
ap_next_index:
    .long 0

    /* 4 GiB identity map with 2 MiB pages, user-accessible so ring-3 code can run anywhere. */
    .balign 4096
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0007
    .quad pd + 0x1007
    .quad pd + 0x2007
    .quad pd + 0x3007
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr

    .bss
    .balign 4096
    .globl ap_stacks
ap_stacks:
    .fill 4096 * 16, 1, 0
    .fill 16384, 1, 0
bsp_stack_top:
    .fill 16384, 1, 0
user_stack_top:
