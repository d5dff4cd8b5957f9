/* The ceiling for exit handling: a minimal KVM loop in C that boots the same PVH probe guest as
 * Vireo and QEMU and does nothing per exit but the least the probe needs (COM1 output, LSR reads,
 * the i8042 reset that ends the run). No irqchip, no devices, no threads.
 *   kvm-baseline PROBE.elf "probe=ports count=N" */
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEM (128u << 20)
#define CHECK(x) do { if ((x) < 0) { perror(#x); exit(2); } } while (0)

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s PROBE.elf CMDLINE\n", argv[0]); return 2; }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC); CHECK(kvm);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0); CHECK(vm);
    CHECK(ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000));
    uint8_t *mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM, .userspace_addr = (uint64_t)mem };
    CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region));

    int fd = open(argv[1], O_RDONLY); CHECK(fd);
    struct stat st; fstat(fd, &st);
    uint8_t *file = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)file;
    uint32_t entry = 0;
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr *ph = (Elf64_Phdr *)(file + eh->e_phoff + i * eh->e_phentsize);
        if (ph->p_type == PT_LOAD) memcpy(mem + ph->p_paddr, file + ph->p_offset, ph->p_filesz);
        if (ph->p_type == PT_NOTE) {
            uint8_t *n = file + ph->p_offset;
            uint32_t *h = (uint32_t *)n;
            if (h[2] == 18) entry = *(uint32_t *)(n + 12 + ((h[0] + 3) & ~3u));
        }
    }
    if (!entry) { fprintf(stderr, "no PVH entry note\n"); return 2; }
    /* hvm_start_info at 0x6000 with the command line at 0x20000 and a one-entry memory map. */
    strcpy((char *)mem + 0x20000, argv[2]);
    uint32_t *si = (uint32_t *)(mem + 0x6000);
    si[0] = 0x336ec578; si[1] = 1;
    *(uint64_t *)(mem + 0x6000 + 24) = 0x20000;
    *(uint64_t *)(mem + 0x6000 + 40) = 0x7000;
    si[12] = 1;
    uint64_t *mm = (uint64_t *)(mem + 0x7000);
    mm[0] = 0; mm[1] = MEM; mm[2] = 1;

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0); CHECK(vcpu);
    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };
    CHECK(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid));
    CHECK(ioctl(vcpu, KVM_SET_CPUID2, &cpuid));
    int runsize = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, runsize, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);

    struct kvm_sregs s; CHECK(ioctl(vcpu, KVM_GET_SREGS, &s));
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 0xb, .present = 1, .db = 1, .s = 1, .g = 1 };
    struct kvm_segment data = code; data.selector = 0x10; data.type = 3;
    struct kvm_segment tr = { .limit = 0x67, .selector = 0x18, .type = 0xb, .present = 1 };
    s.cs = code; s.ds = s.es = s.fs = s.gs = s.ss = data; s.tr = tr;
    s.cr0 = 0x11; s.cr4 = 0; s.efer = 0;
    CHECK(ioctl(vcpu, KVM_SET_SREGS, &s));
    struct kvm_regs r = { .rip = entry, .rbx = 0x6000, .rflags = 2 };
    CHECK(ioctl(vcpu, KVM_SET_REGS, &r));

    uint64_t exits = 0;
    for (;;) {
        CHECK(ioctl(vcpu, KVM_RUN, 0));
        exits++;
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *d = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (run->io.port == 0x3f8) { fputc(d[0], stdout); if (d[0] == '\n') fflush(stdout); }
                else if (run->io.port == 0x64 && d[0] == 0xfe) break;
            } else {
                d[0] = run->io.port == 0x3fd ? 0x60 : 0xff;
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO || run->exit_reason == KVM_EXIT_INTR) {
            continue;
        } else {
            fprintf(stderr, "exit reason %u\n", run->exit_reason);
            return 1;
        }
    }
    fflush(stdout);
    fprintf(stderr, "kvm-baseline: %llu exits\n", (unsigned long long)exits);
    return 0;
}
