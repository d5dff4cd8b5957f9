#define _GNU_SOURCE
#include "ckvm.h"
#include <sys/ioctl.h>
#include <pthread.h>
#include <sys/eventfd.h>

const unsigned long VIREO_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long VIREO_KVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long VIREO_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long VIREO_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long VIREO_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
const unsigned long VIREO_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long VIREO_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long VIREO_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
const unsigned long VIREO_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
const unsigned long VIREO_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
const unsigned long VIREO_KVM_IRQ_LINE = KVM_IRQ_LINE;
const unsigned long VIREO_KVM_IOEVENTFD = KVM_IOEVENTFD;
const unsigned long VIREO_KVM_IRQFD = KVM_IRQFD;
const unsigned int VIREO_KVM_IOEVENTFD_FLAG_DATAMATCH = KVM_IOEVENTFD_FLAG_DATAMATCH;
const unsigned long VIREO_KVM_RUN = KVM_RUN;
const unsigned long VIREO_KVM_GET_REGS = KVM_GET_REGS;
const unsigned long VIREO_KVM_SET_REGS = KVM_SET_REGS;
const unsigned long VIREO_KVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long VIREO_KVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long VIREO_KVM_SET_FPU = KVM_SET_FPU;
const unsigned long VIREO_KVM_SET_CPUID2 = KVM_SET_CPUID2;
const unsigned long VIREO_KVM_SET_MSRS = KVM_SET_MSRS;
const unsigned long VIREO_KVM_GET_MSRS = KVM_GET_MSRS;
const unsigned long VIREO_KVM_GET_LAPIC = KVM_GET_LAPIC;
const unsigned long VIREO_KVM_SET_LAPIC = KVM_SET_LAPIC;
const unsigned long VIREO_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
const unsigned long VIREO_KVM_SET_MP_STATE = KVM_SET_MP_STATE;
const unsigned long VIREO_KVM_GET_FPU = KVM_GET_FPU;
const unsigned long VIREO_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
const unsigned long VIREO_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
const unsigned long VIREO_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
const unsigned long VIREO_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
const unsigned long VIREO_KVM_GET_XCRS = KVM_GET_XCRS;
const unsigned long VIREO_KVM_SET_XCRS = KVM_SET_XCRS;
const unsigned long VIREO_KVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
const unsigned long VIREO_KVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
const unsigned long VIREO_KVM_GET_PIT2 = KVM_GET_PIT2;
const unsigned long VIREO_KVM_SET_PIT2 = KVM_SET_PIT2;
const unsigned long VIREO_KVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
const unsigned long VIREO_KVM_GET_CLOCK = KVM_GET_CLOCK;
const unsigned long VIREO_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
const unsigned int VIREO_KVM_MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;
const unsigned long VIREO_KVM_SET_CLOCK = KVM_SET_CLOCK;
const unsigned long VIREO_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
const unsigned long VIREO_KVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;

const int VIREO_KVM_CAP_NR_VCPUS = KVM_CAP_NR_VCPUS;
const int VIREO_KVM_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS;
const int VIREO_KVM_CAP_IRQCHIP = KVM_CAP_IRQCHIP;
const int VIREO_KVM_CAP_PIT2 = KVM_CAP_PIT2;
const int VIREO_KVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
const int VIREO_KVM_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR;
const int VIREO_KVM_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID;
const int VIREO_KVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
const int VIREO_KVM_CAP_NR_MEMSLOTS = KVM_CAP_NR_MEMSLOTS;
const int VIREO_KVM_CAP_XCRS = KVM_CAP_XCRS;
const int VIREO_KVM_CAP_VCPU_EVENTS = KVM_CAP_VCPU_EVENTS;
const int VIREO_KVM_CAP_DEBUGREGS = KVM_CAP_DEBUGREGS;
const int VIREO_KVM_CAP_ADJUST_CLOCK = KVM_CAP_ADJUST_CLOCK;
const int VIREO_KVM_CAP_TSC_CONTROL = KVM_CAP_TSC_CONTROL;
const int VIREO_KVM_CAP_GET_TSC_KHZ = KVM_CAP_GET_TSC_KHZ;

int vireo_ioctl_none(int fd, unsigned long request) { return ioctl(fd, request, 0); }
int vireo_ioctl_value(int fd, unsigned long request, unsigned long value) { return ioctl(fd, request, value); }
int vireo_ioctl_pointer(int fd, unsigned long request, void *argument) { return ioctl(fd, request, argument); }

uint32_t vireo_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }

struct vireo_io_exit vireo_run_io(const struct kvm_run *run) {
    struct vireo_io_exit io = {
        .direction = run->io.direction,
        .size = run->io.size,
        .port = run->io.port,
        .count = run->io.count,
        .data_offset = run->io.data_offset,
    };
    return io;
}

struct vireo_mmio_exit vireo_run_mmio(struct kvm_run *run) {
    struct vireo_mmio_exit mmio = {
        .physical_address = run->mmio.phys_addr,
        .data = run->mmio.data,
        .length = run->mmio.len,
        .is_write = run->mmio.is_write,
    };
    return mmio;
}

struct vireo_internal_error vireo_run_internal_error(const struct kvm_run *run) {
    struct vireo_internal_error e = { .suberror = run->internal.suberror, .ndata = run->internal.ndata };
    for (uint32_t i = 0; i < 4 && i < run->internal.ndata; i++) e.data[i] = run->internal.data[i];
    return e;
}

uint64_t vireo_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}

uint32_t vireo_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

void vireo_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

size_t vireo_cpuid2_size(uint32_t count) {
    return sizeof(struct kvm_cpuid2) + (size_t)count * sizeof(struct kvm_cpuid_entry2);
}
size_t vireo_msrs_size(uint32_t count) {
    return sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry);
}
struct kvm_cpuid_entry2 *_Nonnull vireo_cpuid2_entries(struct kvm_cpuid2 *_Nonnull cpuid) { return cpuid->entries; }
struct kvm_msr_entry *_Nonnull vireo_msrs_entries(struct kvm_msrs *_Nonnull msrs) { return msrs->entries; }
size_t vireo_msr_list_size(uint32_t count) { return sizeof(struct kvm_msr_list) + (size_t)count * sizeof(uint32_t); }
uint32_t *_Nonnull vireo_msr_list_indices(struct kvm_msr_list *_Nonnull list) { return list->indices; }

int vireo_set_thread_name(const char *name) { return pthread_setname_np(pthread_self(), name); }
int vireo_eventfd_cloexec(unsigned int initial) { return eventfd(initial, EFD_CLOEXEC); }
