// C shim over <linux/kvm.h>. Request numbers are computed by the C compiler from the kernel's
// own macros and exported as constants, so no _IOW arithmetic is ever typed into Swift.
#ifndef VIREO_CKVM_H
#define VIREO_CKVM_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>

#pragma clang assume_nonnull begin

extern const unsigned long VIREO_KVM_GET_API_VERSION;
extern const unsigned long VIREO_KVM_CREATE_VM;
extern const unsigned long VIREO_KVM_CHECK_EXTENSION;
extern const unsigned long VIREO_KVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long VIREO_KVM_GET_SUPPORTED_CPUID;
extern const unsigned long VIREO_KVM_CREATE_VCPU;
extern const unsigned long VIREO_KVM_SET_USER_MEMORY_REGION;
extern const unsigned long VIREO_KVM_SET_TSS_ADDR;
extern const unsigned long VIREO_KVM_CREATE_IRQCHIP;
extern const unsigned long VIREO_KVM_CREATE_PIT2;
extern const unsigned long VIREO_KVM_IRQ_LINE;
extern const unsigned long VIREO_KVM_IOEVENTFD;
extern const unsigned long VIREO_KVM_IRQFD;
extern const unsigned int VIREO_KVM_IOEVENTFD_FLAG_DATAMATCH;
extern const unsigned long VIREO_KVM_RUN;
extern const unsigned long VIREO_KVM_GET_REGS;
extern const unsigned long VIREO_KVM_SET_REGS;
extern const unsigned long VIREO_KVM_GET_SREGS;
extern const unsigned long VIREO_KVM_SET_SREGS;
extern const unsigned long VIREO_KVM_SET_FPU;
extern const unsigned long VIREO_KVM_SET_CPUID2;
extern const unsigned long VIREO_KVM_SET_MSRS;
extern const unsigned long VIREO_KVM_GET_MSRS;
extern const unsigned long VIREO_KVM_GET_LAPIC;
extern const unsigned long VIREO_KVM_SET_LAPIC;
extern const unsigned long VIREO_KVM_GET_MP_STATE;
extern const unsigned long VIREO_KVM_SET_MP_STATE;
extern const unsigned long VIREO_KVM_GET_FPU;
extern const unsigned long VIREO_KVM_GET_VCPU_EVENTS;
extern const unsigned long VIREO_KVM_SET_VCPU_EVENTS;
extern const unsigned long VIREO_KVM_GET_DEBUGREGS;
extern const unsigned long VIREO_KVM_SET_DEBUGREGS;
extern const unsigned long VIREO_KVM_GET_XCRS;
extern const unsigned long VIREO_KVM_SET_XCRS;
extern const unsigned long VIREO_KVM_GET_IRQCHIP;
extern const unsigned long VIREO_KVM_SET_IRQCHIP;
extern const unsigned long VIREO_KVM_GET_PIT2;
extern const unsigned long VIREO_KVM_SET_PIT2;
extern const unsigned long VIREO_KVM_GET_MSR_INDEX_LIST;
extern const unsigned long VIREO_KVM_GET_CLOCK;
extern const unsigned long VIREO_KVM_GET_DIRTY_LOG;
extern const unsigned int VIREO_KVM_MEM_LOG_DIRTY_PAGES;
extern const unsigned long VIREO_KVM_SET_CLOCK;
extern const unsigned long VIREO_KVM_GET_TSC_KHZ;
extern const unsigned long VIREO_KVM_SET_TSC_KHZ;

extern const int VIREO_KVM_CAP_NR_VCPUS;
extern const int VIREO_KVM_CAP_MAX_VCPUS;
extern const int VIREO_KVM_CAP_IRQCHIP;
extern const int VIREO_KVM_CAP_PIT2;
extern const int VIREO_KVM_CAP_USER_MEMORY;
extern const int VIREO_KVM_CAP_SET_TSS_ADDR;
extern const int VIREO_KVM_CAP_EXT_CPUID;
extern const int VIREO_KVM_CAP_IMMEDIATE_EXIT;
extern const int VIREO_KVM_CAP_NR_MEMSLOTS;
extern const int VIREO_KVM_CAP_XCRS;
extern const int VIREO_KVM_CAP_VCPU_EVENTS;
extern const int VIREO_KVM_CAP_DEBUGREGS;
extern const int VIREO_KVM_CAP_ADJUST_CLOCK;
extern const int VIREO_KVM_CAP_TSC_CONTROL;
extern const int VIREO_KVM_CAP_GET_TSC_KHZ;

// ioctl(2) is variadic, which Swift cannot call; these fix the third argument's type.
int vireo_ioctl_none(int fd, unsigned long request);
int vireo_ioctl_value(int fd, unsigned long request, unsigned long value);
int vireo_ioctl_pointer(int fd, unsigned long request, void *_Nullable argument);

// struct kvm_run keeps each exit's payload in an anonymous union; these give Swift a stable view.
struct vireo_io_exit {
    uint8_t direction;   // KVM_EXIT_IO_IN or KVM_EXIT_IO_OUT
    uint8_t size;        // 1, 2 or 4
    uint16_t port;
    uint32_t count;
    uint64_t data_offset; // from the start of the kvm_run mapping
};
struct vireo_mmio_exit {
    uint64_t physical_address;
    uint8_t *data;        // 8 bytes inside the kvm_run mapping
    uint32_t length;
    uint8_t is_write;
};
struct vireo_internal_error {
    uint32_t suberror;
    uint32_t ndata;
    uint64_t data[4];
};

uint32_t vireo_run_exit_reason(const struct kvm_run *run);
struct vireo_io_exit vireo_run_io(const struct kvm_run *run);
struct vireo_mmio_exit vireo_run_mmio(struct kvm_run *run);
struct vireo_internal_error vireo_run_internal_error(const struct kvm_run *run);
uint64_t vireo_run_fail_entry_reason(const struct kvm_run *run);
uint32_t vireo_run_system_event_type(const struct kvm_run *run);
void vireo_run_set_immediate_exit(struct kvm_run *run, uint8_t value);

// Flexible-array structures: allocated by the caller with room for `count` entries.
size_t vireo_cpuid2_size(uint32_t count);
size_t vireo_msrs_size(uint32_t count);
size_t vireo_msr_list_size(uint32_t count);
uint32_t *_Nonnull vireo_msr_list_indices(struct kvm_msr_list *_Nonnull list);
struct kvm_cpuid_entry2 *_Nonnull vireo_cpuid2_entries(struct kvm_cpuid2 *_Nonnull cpuid);
struct kvm_msr_entry *_Nonnull vireo_msrs_entries(struct kvm_msrs *_Nonnull msrs);

// pthread_setname_np is a GNU extension that Swift's Glibc module does not export.
int vireo_set_thread_name(const char *name);
// eventfd(2) lives in <sys/eventfd.h>, which the Glibc module does not include.
int vireo_eventfd_cloexec(unsigned int initial);

#pragma clang assume_nonnull end

#endif
