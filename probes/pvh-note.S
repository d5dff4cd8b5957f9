/* Xen's PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): its presence makes Vireo and QEMU enter the
 * probe in 32-bit protected mode at _start_pvh with hvm_start_info in %ebx. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long _start_pvh
    .balign 4
