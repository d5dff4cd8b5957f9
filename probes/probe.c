/* Vireo probe guest: a freestanding program that reports, over COM1, what the VMM gave it.
 * The command line picks the test: probe=info|smp|irq|triple|acpi|reboot|ports|dirty|hello|... Output lines are
 * "key: value" so the host test can assert them; the probe ends by pulsing the reset line
 * (i8042 0xFE), which Vireo reports as a clean reboot, or by writing QEMU's isa-debug-exit port. */
#include <stdint.h>
#include <stddef.h>

#define MODE_LINUX64 0
#define MODE_PVH 1

#define COM1 0x3f8
#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL
#define BOOT_MARKER ((volatile uint8_t *)0xd0000000UL)

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t mmio_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* ---- serial output ---- */
static volatile int print_lock;
static void lock(void) { while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE)) __asm__ volatile("pause"); }
static void unlock(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

static void putc_raw(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {}
    outb(COM1, (uint8_t)c);
}
static void puts_raw(const char *s) { while (*s) { if (*s == '\n') putc_raw('\r'); putc_raw(*s++); } }
static void put_hex(uint64_t v) {
    char buf[19]; int i = 18; buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v && i > 2);
    buf[--i] = 'x'; buf[--i] = '0';
    puts_raw(&buf[i]);
}
static void put_dec(uint64_t v) {
    char buf[21]; int i = 20; buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts_raw(&buf[i]);
}

/* ---- boot information, normalised over the two entry protocols ---- */
struct e820 { uint64_t addr, size; uint32_t type; };
static int boot_mode;
static uint64_t rsdp_from_boot;     /* zero page acpi_rsdp_addr or PVH rsdp_paddr; 0 if not given */
static const char *cmdline = "";
static uint64_t initrd_addr, initrd_size;
static struct e820 memmap[32];
static int memmap_count;

static void read_boot_info(int mode, uintptr_t info) {
    boot_mode = mode;
    if (mode == MODE_LINUX64) {
        const uint8_t *zp = (const uint8_t *)info;
        uint64_t cl = *(const uint32_t *)(zp + 0x228) | ((uint64_t)*(const uint32_t *)(zp + 0xc8) << 32);
        if (cl) cmdline = (const char *)cl;
        initrd_addr = *(const uint32_t *)(zp + 0x218) | ((uint64_t)*(const uint32_t *)(zp + 0xc0) << 32);
        initrd_size = *(const uint32_t *)(zp + 0x21c);
        rsdp_from_boot = *(const uint64_t *)(zp + 0x070);
        memmap_count = zp[0x1e8];
        if (memmap_count > 32) memmap_count = 32;
        for (int i = 0; i < memmap_count; i++) {
            const uint8_t *e = zp + 0x2d0 + i * 20;
            memmap[i].addr = *(const uint64_t *)e;
            memmap[i].size = *(const uint64_t *)(e + 8);
            memmap[i].type = *(const uint32_t *)(e + 16);
        }
    } else {
        const uint8_t *si = (const uint8_t *)info;
        if (*(const uint32_t *)si != 0x336ec578) { puts_raw("error: bad hvm_start_info magic\n"); return; }
        uint64_t cl = *(const uint64_t *)(si + 24);
        if (cl) cmdline = (const char *)cl;
        if (*(const uint32_t *)(si + 12) > 0) {
            const uint8_t *mod = (const uint8_t *)*(const uint64_t *)(si + 16);
            initrd_addr = *(const uint64_t *)mod;
            initrd_size = *(const uint64_t *)(mod + 8);
        }
        rsdp_from_boot = *(const uint64_t *)(si + 32);
        const uint8_t *mm = (const uint8_t *)*(const uint64_t *)(si + 40);
        memmap_count = (int)*(const uint32_t *)(si + 48);
        if (memmap_count > 32) memmap_count = 32;
        for (int i = 0; i < memmap_count; i++) {
            memmap[i].addr = *(const uint64_t *)(mm + i * 24);
            memmap[i].size = *(const uint64_t *)(mm + i * 24 + 8);
            memmap[i].type = *(const uint32_t *)(mm + i * 24 + 16);
        }
    }
}

static size_t str_len(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static int starts_with(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }

/* Value of "key=" in the command line, copied into out (space-terminated). */
static int cmdline_value(const char *key, char *out, int cap) {
    const char *s = cmdline;
    while (*s) {
        while (*s == ' ') s++;
        if (starts_with(s, key) && s[str_len(key)] == '=') {
            s += str_len(key) + 1;
            int n = 0;
            while (*s && *s != ' ' && n < cap - 1) out[n++] = *s++;
            out[n] = 0;
            return 1;
        }
        while (*s && *s != ' ') s++;
    }
    return 0;
}
static uint64_t parse_dec(const char *s) { uint64_t v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (uint64_t)(*s++ - '0'); return v; }
static int str_eq(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }

/* ---- ending the run: power off through ACPI S5 where the FADT has an I/O sleep register (a
 * reboot would start a library VM again), else reset through the i8042 (`vireo run` stops with
 * status 0 either way), else QEMU's isa-debug-exit for side-by-side runs ---- */
static int parse_acpi(void);
static void acpi_power_off(void);
static int acpi_sleep_is_io(void);
static void __attribute__((noreturn)) finish(void) {
    puts_raw("probe: done\n");
    if (parse_acpi() && acpi_sleep_is_io()) acpi_power_off();
    outb(0x64, 0xfe);
    outb(0xf4, 0x00);
    for (;;) __asm__ volatile("cli; hlt");
}

/* ---- MP table ---- */
static uint8_t checksum(const uint8_t *p, size_t n) { uint8_t s = 0; while (n--) s += *p++; return s; }
static int mp_apic_ids[64];
static int mp_cpu_count;
static uint32_t mp_ioapic_addr;

static int parse_mp_table(void) {
    for (uintptr_t a = 0xf0000; a < 0x100000; a += 16) {
        const uint8_t *fp = (const uint8_t *)a;
        if (!starts_with((const char *)fp, "_MP_")) continue;
        if (checksum(fp, 16) != 0) { puts_raw("mptable: floating pointer checksum bad\n"); return 0; }
        const uint8_t *ct = (const uint8_t *)(uintptr_t)*(const uint32_t *)(fp + 4);
        if (!starts_with((const char *)ct, "PCMP")) { puts_raw("mptable: no PCMP\n"); return 0; }
        uint16_t len = *(const uint16_t *)(ct + 4);
        if (checksum(ct, len) != 0) { puts_raw("mptable: table checksum bad\n"); return 0; }
        uint16_t count = *(const uint16_t *)(ct + 34);
        const uint8_t *e = ct + 44;
        for (int i = 0; i < count; i++) {
            if (e[0] == 0) { if ((e[3] & 1) && mp_cpu_count < 64) mp_apic_ids[mp_cpu_count++] = e[1]; e += 20; }
            else { if (e[0] == 2) mp_ioapic_addr = *(const uint32_t *)(e + 4); e += 8; }
        }
        return 1;
    }
    puts_raw("mptable: not found\n");
    return 0;
}

/* ---- ACPI: RSDP → XSDT → FADT/MADT → DSDT, every checksum checked. The DSDT is read without
 * an AML interpreter: named objects are found by their encodings (as small kernels find \_S5). */
static struct {
    int found, checksums_ok, hw_reduced;
    uint64_t rsdp, xsdt, fadt, madt, dsdt;
    uint16_t reset_port, sleep_port, status_port, ged_port;
    int sleep_io;
    uint8_t reset_space;            /* 0: system memory, 1: system I/O (the GAS address space) */
    uint64_t reset_address;
    uint8_t reset_value, s5_type;
    uint32_t ged_gsi, dsdt_length;
    int virtio_count, cpu_count;
    int apic_ids[64];
    uint32_t ioapic_addr;
    uint64_t vmgenid_addr;
} acpi;

static int bytes_eq(const uint8_t *a, const char *b, int n) { for (int i = 0; i < n; i++) if (a[i] != (uint8_t)b[i]) return 0; return 1; }

static int table_ok(uint64_t address, const char *signature) {
    const uint8_t *t = (const uint8_t *)address;
    if (!bytes_eq(t, signature, 4)) { puts_raw("acpi: table at "); put_hex(address); puts_raw(" is not "); puts_raw(signature); puts_raw("\n"); return 0; }
    uint32_t length = *(const uint32_t *)(t + 4);
    if (length < 36 || length > 0x10000 || checksum(t, length) != 0) {
        puts_raw("acpi: "); puts_raw(signature); puts_raw(" checksum or length bad\n"); return 0;
    }
    return 1;
}

/* The first AML integer at p (Zero, One, Byte/Word/DWordConst). */
static uint64_t aml_integer(const uint8_t *p) {
    switch (p[0]) {
    case 0x00: return 0;
    case 0x01: return 1;
    case 0x0a: return p[1];
    case 0x0b: return *(const uint16_t *)(p + 1);
    case 0x0c: return *(const uint32_t *)(p + 1);
    default: return ~0ull;
    }
}

static const uint8_t *find_bytes(const uint8_t *from, const uint8_t *end, const char *needle, int n) {
    for (const uint8_t *p = from; p + n <= end; p++) if (bytes_eq(p, needle, n)) return p;
    return 0;
}

static void parse_dsdt(void) {
    const uint8_t *d = (const uint8_t *)acpi.dsdt;
    const uint8_t *end = d + acpi.dsdt_length;
    for (const uint8_t *p = d + 36; (p = find_bytes(p, end, "LNRO0005", 8)); p += 8) acpi.virtio_count++;
    /* Name(\_S5, Package(4){type, ...}): NameOp, '\', "_S5_", PackageOp, PkgLength, count, type. */
    const uint8_t *s5 = find_bytes(d + 36, end, "_S5_", 4);
    if (s5 && s5[4] == 0x12) acpi.s5_type = (uint8_t)aml_integer(s5 + 7);
    /* The GED: its _CRS interrupt descriptor (0x89) and its SystemIO operation region. */
    const uint8_t *ged = find_bytes(d + 36, end, "ACPI0013", 8);
    if (ged) {
        for (const uint8_t *p = ged; p + 9 <= end; p++)
            if (p[0] == 0x89 && p[1] == 0x06 && p[2] == 0 && p[4] == 1) { acpi.ged_gsi = *(const uint32_t *)(p + 5); break; }
        for (const uint8_t *p = ged; p + 8 <= end; p++)
            if (p[0] == 0x5b && p[1] == 0x80 && p[6] == 0x01) { acpi.ged_port = (uint16_t)aml_integer(p + 7); break; }
    }
    /* VGEN's Name(ADDR, Package(2){DWord low, DWord high}). */
    const uint8_t *addr = find_bytes(d + 36, end, "ADDR", 4);
    if (addr && addr[4] == 0x12 && addr[7] == 0x0c && addr[12] == 0x0c)
        acpi.vmgenid_addr = *(const uint32_t *)(addr + 8) | ((uint64_t)*(const uint32_t *)(addr + 13) << 32);
}

static void parse_madt(void) {
    const uint8_t *m = (const uint8_t *)acpi.madt;
    uint32_t length = *(const uint32_t *)(m + 4);
    for (uint32_t off = 44; off + 2 <= length && m[off + 1] >= 2; off += m[off + 1]) {
        const uint8_t *e = m + off;
        if (e[0] == 0 && (*(const uint32_t *)(e + 4) & 1) && acpi.cpu_count < 64) acpi.apic_ids[acpi.cpu_count++] = e[3];
        if (e[0] == 9 && (*(const uint32_t *)(e + 8) & 1) && acpi.cpu_count < 64) acpi.apic_ids[acpi.cpu_count++] = (int)*(const uint32_t *)(e + 4);
        if (e[0] == 1) acpi.ioapic_addr = *(const uint32_t *)(e + 4);
    }
}

static int parse_acpi(void) {
    if (acpi.found) return 1;
    uint64_t rsdp = rsdp_from_boot;
    const char *source = rsdp ? (boot_mode == MODE_PVH ? "pvh" : "zeropage") : "scan";
    if (!rsdp)
        for (uintptr_t a = 0xe0000; a < 0x100000; a += 16)
            if (bytes_eq((const uint8_t *)a, "RSD PTR ", 8)) { rsdp = a; break; }
    if (!rsdp) return 0;
    const uint8_t *r = (const uint8_t *)rsdp;
    acpi.rsdp = rsdp;
    acpi.checksums_ok = checksum(r, 20) == 0 && checksum(r, 36) == 0;
    acpi.xsdt = *(const uint64_t *)(r + 24);
    puts_raw("acpi: rsdp="); put_hex(rsdp); puts_raw(" revision="); put_dec(r[15]); puts_raw(" source="); puts_raw(source); puts_raw("\n");
    if (!acpi.checksums_ok || !table_ok(acpi.xsdt, "XSDT")) { acpi.checksums_ok = 0; return 0; }
    const uint8_t *x = (const uint8_t *)acpi.xsdt;
    uint32_t entries = (*(const uint32_t *)(x + 4) - 36) / 8;
    for (uint32_t i = 0; i < entries; i++) {
        uint64_t t = *(const uint64_t *)(x + 36 + i * 8);
        if (bytes_eq((const uint8_t *)t, "FACP", 4)) acpi.fadt = t;
        if (bytes_eq((const uint8_t *)t, "APIC", 4)) acpi.madt = t;
    }
    if (!acpi.fadt || !acpi.madt || !table_ok(acpi.fadt, "FACP") || !table_ok(acpi.madt, "APIC")) { acpi.checksums_ok = 0; return 0; }
    const uint8_t *f = (const uint8_t *)acpi.fadt;
    acpi.hw_reduced = (*(const uint32_t *)(f + 112) >> 20) & 1;
    acpi.reset_space = f[116];
    acpi.reset_address = *(const uint64_t *)(f + 116 + 4);
    acpi.reset_port = (uint16_t)acpi.reset_address;
    acpi.reset_value = f[128];
    acpi.dsdt = *(const uint64_t *)(f + 140);
    acpi.sleep_port = (uint16_t)*(const uint64_t *)(f + 244 + 4);
    acpi.sleep_io = f[244] == 1 && acpi.sleep_port != 0;
    acpi.status_port = (uint16_t)*(const uint64_t *)(f + 256 + 4);
    if (!table_ok(acpi.dsdt, "DSDT")) { acpi.checksums_ok = 0; return 0; }
    acpi.dsdt_length = *(const uint32_t *)((const uint8_t *)acpi.dsdt + 4);
    parse_madt();
    parse_dsdt();
    acpi.found = 1;
    return 1;
}

static void print_acpi(void) {
    puts_raw("acpi: checksums ok\n");
    puts_raw("acpi: madt cpus="); put_dec((uint64_t)acpi.cpu_count); puts_raw(" ioapic="); put_hex(acpi.ioapic_addr); puts_raw("\n");
    puts_raw("acpi: fadt hw_reduced="); put_dec((uint64_t)acpi.hw_reduced);
    puts_raw(" reset="); put_hex(acpi.reset_port); puts_raw("/"); put_hex(acpi.reset_value);
    puts_raw(" sleep="); put_hex(acpi.sleep_port); puts_raw(" status="); put_hex(acpi.status_port); puts_raw("\n");
    puts_raw("acpi: dsdt s5="); put_dec(acpi.s5_type); puts_raw(" virtio="); put_dec((uint64_t)acpi.virtio_count);
    puts_raw(" ged_gsi="); put_dec(acpi.ged_gsi); puts_raw(" ged_port="); put_hex(acpi.ged_port); puts_raw("\n");
    if (acpi.vmgenid_addr) {
        const uint8_t *g = (const uint8_t *)acpi.vmgenid_addr;
        puts_raw("acpi: vmgenid=");
        for (int i = 0; i < 16; i++) { putc_raw("0123456789abcdef"[g[i] >> 4]); putc_raw("0123456789abcdef"[g[i] & 15]); }
        puts_raw("\n");
    }
}

/* ---- probe=info ---- */
static void probe_info(void) {
    puts_raw("cmdline: "); puts_raw(cmdline); puts_raw("\n");
    for (int i = 0; i < memmap_count; i++) {
        puts_raw("e820: "); put_hex(memmap[i].addr); puts_raw(" "); put_hex(memmap[i].size);
        puts_raw(" "); put_dec(memmap[i].type); puts_raw("\n");
    }
    if (initrd_size) {
        uint32_t h = 2166136261u;   /* FNV-1a over every initrd byte */
        const uint8_t *p = (const uint8_t *)initrd_addr;
        for (uint64_t i = 0; i < initrd_size; i++) { h ^= p[i]; h *= 16777619u; }
        puts_raw("initrd: size="); put_dec(initrd_size); puts_raw(" fnv1a="); put_hex(h);
        puts_raw(" aligned="); put_dec((initrd_addr & 0xfff) == 0); puts_raw("\n");
    } else {
        puts_raw("initrd: none\n");
    }
    if (boot_mode == MODE_LINUX64) {
        extern uintptr_t probe_zero_page;
        const uint8_t *zp = (const uint8_t *)probe_zero_page;
        puts_raw("zeropage: loader="); put_hex(zp[0x210]);
        puts_raw(" boot_flag="); put_hex(*(const uint16_t *)(zp + 0x1fe));
        puts_raw(" header="); put_hex(*(const uint32_t *)(zp + 0x202)); puts_raw("\n");
    }
    uint32_t r[4], v[4];
    cpuid(0, 0, r);
    char vendor[13];
    *(uint32_t *)&vendor[0] = r[1]; *(uint32_t *)&vendor[4] = r[3]; *(uint32_t *)&vendor[8] = r[2]; vendor[12] = 0;
    cpuid(1, 0, v);
    puts_raw("cpuid: vendor="); puts_raw(vendor);
    puts_raw(" hypervisor="); put_dec(v[2] >> 31);
    puts_raw(" apic="); put_dec(v[1] >> 24);
    cpuid(0x40000000, 0, r);
    char sig[13];
    *(uint32_t *)&sig[0] = r[1]; *(uint32_t *)&sig[4] = r[2]; *(uint32_t *)&sig[8] = r[3]; sig[12] = 0;
    puts_raw(" hv_signature="); puts_raw(sig); puts_raw("\n");
    /* The feature words --cpu changes. */
    uint32_t l7[4] = {0}, x1[4], kvm[4];
    cpuid(0, 0, r);
    if (r[0] >= 7) cpuid(7, 0, l7);
    cpuid(0x80000001, 0, x1);
    cpuid(0x40000001, 0, kvm);
    puts_raw("cpuid-features: 1.ecx="); put_hex(v[2]); puts_raw(" 7.ebx="); put_hex(l7[1]); puts_raw(" 7.ecx="); put_hex(l7[2]);
    puts_raw(" 80000001.ecx="); put_hex(x1[2]); puts_raw(" 80000001.edx="); put_hex(x1[3]); puts_raw(" 40000001.eax="); put_hex(kvm[0]); puts_raw("\n");
    if (parse_acpi()) print_acpi();
    else puts_raw("acpi: none\n");
    if (parse_mp_table()) {
        puts_raw("mptable: cpus="); put_dec((uint64_t)mp_cpu_count);
        puts_raw(" ioapic="); put_hex(mp_ioapic_addr); puts_raw("\n");
    }
}

/* ---- probe=smp: start every AP the MP table lists through INIT/SIPI ---- */
extern char trampoline_start[], trampoline_end[], trampoline_load[];
static volatile int aps_online;

void ap_main(int index) {
    uint32_t apic = mmio_read32(LAPIC_BASE + 0x20) >> 24;
    lock();
    puts_raw("cpu: index="); put_dec((uint64_t)index + 1); puts_raw(" apic="); put_dec(apic); puts_raw(" online\n");
    unlock();
    __atomic_add_fetch(&aps_online, 1, __ATOMIC_SEQ_CST);
    for (;;) __asm__ volatile("cli; hlt");
}

static void icr_send(uint32_t apic, uint32_t low) {
    mmio_write32(LAPIC_BASE + 0x310, apic << 24);
    mmio_write32(LAPIC_BASE + 0x300, low);
    while (mmio_read32(LAPIC_BASE + 0x300) & (1 << 12)) {}
}

static void probe_smp(void) {
    /* The CPUs the platform describes: the MADT with ACPI, the MP table without. */
    if (parse_acpi()) {
        mp_cpu_count = acpi.cpu_count;
        for (int i = 0; i < acpi.cpu_count; i++) mp_apic_ids[i] = acpi.apic_ids[i];
        puts_raw("smp: cpus from the madt\n");
    } else if (!parse_mp_table()) return;
    uint8_t *dst = (uint8_t *)0x10000;
    for (char *s = trampoline_load; s < trampoline_load + (trampoline_end - trampoline_start); s++) *dst++ = (uint8_t)*s;
    mmio_write32(LAPIC_BASE + 0xf0, mmio_read32(LAPIC_BASE + 0xf0) | 0x100);
    uint32_t self = mmio_read32(LAPIC_BASE + 0x20) >> 24;
    lock(); puts_raw("cpu: index=0 apic="); put_dec(self); puts_raw(" online\n"); unlock();
    int expected = 0;
    for (int i = 0; i < mp_cpu_count; i++) {
        if ((uint32_t)mp_apic_ids[i] == self) continue;
        expected++;
        icr_send((uint32_t)mp_apic_ids[i], 0x4500);           /* INIT */
        icr_send((uint32_t)mp_apic_ids[i], 0x4600 | 0x10);    /* SIPI, vector 0x10 → 0x10000 */
        icr_send((uint32_t)mp_apic_ids[i], 0x4600 | 0x10);
    }
    for (uint64_t spins = 0; aps_online < expected && spins < 2000000000ull; spins++) __asm__ volatile("pause");
    lock(); puts_raw("smp: online="); put_dec((uint64_t)aps_online + 1); puts_raw(" of "); put_dec((uint64_t)mp_cpu_count); puts_raw("\n"); unlock();
}

/* ---- probe=irq: PIT timer and serial receive interrupts through the IOAPIC ---- */
struct interrupt_frame;
static volatile uint64_t timer_ticks;
static volatile int serial_byte = -1;
static void lapic_eoi(void) { mmio_write32(LAPIC_BASE + 0xb0, 0); }

__attribute__((interrupt)) static void timer_isr(struct interrupt_frame *f) { (void)f; timer_ticks++; lapic_eoi(); }
__attribute__((interrupt)) static void serial_isr(struct interrupt_frame *f) {
    (void)f;
    while (inb(COM1 + 5) & 1) serial_byte = inb(COM1);
    lapic_eoi();
}
__attribute__((interrupt)) static void spurious_isr(struct interrupt_frame *f) { (void)f; lapic_eoi(); }

static uint64_t idt[256 * 2] __attribute__((aligned(16)));
static void set_gate(int vector, void (*handler)(struct interrupt_frame *)) {
    uint64_t a = (uint64_t)handler;
    idt[vector * 2] = (a & 0xffff) | (0x18ull << 16) | (0x8eull << 40) | ((a >> 16 & 0xffff) << 48);
    idt[vector * 2 + 1] = a >> 32;
}
static void ioapic_route(int pin, int vector) {
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin + 1); mmio_write32(IOAPIC_BASE + 0x10, 0);   /* dest APIC 0 */
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);     mmio_write32(IOAPIC_BASE + 0x10, (uint32_t)vector);
}

static void probe_irq(void) {
    for (int v = 0; v < 256; v++) set_gate(v, spurious_isr);
    set_gate(0x20, timer_isr);
    set_gate(0x24, serial_isr);
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" :: "m"(idtr));
    outb(0x21, 0xff); outb(0xa1, 0xff);                        /* mask the 8259s: IOAPIC only */
    mmio_write32(LAPIC_BASE + 0xf0, 0x1ff);                    /* LAPIC on, spurious vector 0xff */
    mmio_write32(LAPIC_BASE + 0x80, 0);                        /* TPR: accept everything */
    ioapic_route(0, 0x20);                                     /* Vireo/KVM default: ISA IRQ0 on pin 0 */
    ioapic_route(2, 0x20);                                     /* PC convention (QEMU): IRQ0 on pin 2 */
    ioapic_route(4, 0x24);
    outb(0x43, 0x34); outb(0x40, 0x9c); outb(0x40, 0x2e);      /* PIT ch0, rate generator, 100 Hz */
    __asm__ volatile("sti");
    while (timer_ticks < 3) __asm__ volatile("hlt");
    puts_raw("irq: timer ticks>=3 vector=0x20\n");
    outb(COM1 + 4, 0x0b);                                      /* DTR, RTS, OUT2 */
    outb(COM1 + 1, 0x01);                                      /* IER: received data available */
    puts_raw("irq: waiting for serial input\n");
    while (serial_byte < 0) __asm__ volatile("hlt");
    __asm__ volatile("cli");
    puts_raw("irq: serial rx="); putc_raw((char)serial_byte); puts_raw(" vector=0x24\n");
}

/* ---- probe=acpi: read the tables, wait for the power button (the GED's interrupt through the
 * IOAPIC), then do what acpi-action= says: s5 (power off, the default), reset, or ignore ---- */
static volatile int ged_fired;
__attribute__((interrupt)) static void ged_isr(struct interrupt_frame *f) { (void)f; ged_fired = 1; lapic_eoi(); }

static void acpi_power_off(void) {
    outb(acpi.sleep_port, (uint8_t)((acpi.s5_type << 2) | 0x20));
}
static int acpi_sleep_is_io(void) { return acpi.sleep_io; }

static void probe_acpi(void) {
    if (!parse_acpi()) { puts_raw("acpi: none\n"); return; }
    print_acpi();
    char action[16] = "s5";
    cmdline_value("acpi-action", action, sizeof action);
    if (str_eq(action, "reset-now")) {
        puts_raw("acpi: writing the reset register\n");
        outb(acpi.reset_port, acpi.reset_value);
        for (volatile int i = 0; i < 1000000; i++) {}
        puts_raw("acpi: still running after reset (unexpected)\n");
        return;
    }
    for (int v = 0; v < 256; v++) set_gate(v, spurious_isr);
    set_gate(0x30, ged_isr);
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" :: "m"(idtr));
    outb(0x21, 0xff); outb(0xa1, 0xff);
    mmio_write32(LAPIC_BASE + 0xf0, 0x1ff);
    mmio_write32(LAPIC_BASE + 0x80, 0);
    ioapic_route((int)acpi.ged_gsi, 0x30);
    puts_raw("acpi: waiting for the power button\n");
    for (;;) {
        __asm__ volatile("sti; hlt; cli");
        if (!ged_fired) continue;
        ged_fired = 0;
        uint8_t events = inb(acpi.ged_port);
        puts_raw("acpi: ged interrupt events="); put_hex(events); puts_raw("\n");
        if (!(events & 1)) continue;
        puts_raw("acpi: power button pressed\n");
        if (str_eq(action, "ignore")) { puts_raw("acpi: ignoring it\n"); continue; }
        if (str_eq(action, "reset")) { outb(acpi.reset_port, acpi.reset_value); continue; }
        puts_raw("acpi: entering S5\n");
        acpi_power_off();
        puts_raw("acpi: still running after S5 (unexpected)\n");
        return;
    }
}

/* ---- probe=reboot: tells a fresh boot from one whose RAM survived, brings up every AP the
 * platform lists, then resets through the ACPI reset register (the i8042 without ACPI) ---- */
#define REBOOT_MARKER ((volatile uint64_t *)0x1800000UL)
static void probe_reboot(void) {
    if (*REBOOT_MARKER == 0x5649524545424f4full) puts_raw("reboot: marker survived, RAM was not cleared\n");
    else puts_raw("reboot: RAM clear\n");
    *REBOOT_MARKER = 0x5649524545424f4full;
    probe_smp();
    if (parse_acpi() && (acpi.reset_space == 0 || acpi.reset_space == 1) && acpi.reset_address) {
        puts_raw("reboot: resetting through the ACPI reset register\n");
        /* Vireo's is an I/O port; QEMU microvm's sits in its GED's MMIO window. */
        if (acpi.reset_space == 1) outb(acpi.reset_port, acpi.reset_value);
        else *(volatile uint8_t *)(uintptr_t)acpi.reset_address = acpi.reset_value;
    } else {
        puts_raw("reboot: resetting through the i8042\n");
        outb(0x64, 0xfe);
    }
    for (;;) __asm__ volatile("cli; hlt");
}

/* ---- probe=triple: an exception with no IDT shuts the CPU down ---- */
static void probe_triple(void) {
    puts_raw("triple: faulting now\n");
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { 0, 0 };
    __asm__ volatile("lidt %0; ud2" :: "m"(idtr));
    puts_raw("triple: still alive (unexpected)\n");
}

/* ---- probe=ports count=N: N port writes from ring 3, where this host runs guests natively ---- */
extern void enter_user_mode(void (*fn)(uint64_t), uint64_t arg) __attribute__((noreturn));
static void user_port_loop(uint64_t count) {
    puts_raw("ports: start\n");
    for (uint64_t i = 0; i < count; i++) outb(COM1 + 7, (uint8_t)i);   /* UART scratch register */
    puts_raw("ports: done count="); put_dec(count); puts_raw("\n");
    finish();
}

/* ---- probe=blk: a minimal virtio-mmio block driver (polled), per virtio 1.x §3.1 and §5.2 ---- */
#define VQ_SIZE 8
struct vq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
static struct vq_desc vq_descs[VQ_SIZE] __attribute__((aligned(16)));
static struct { uint16_t flags, idx, ring[VQ_SIZE], used_event; } vq_avail __attribute__((aligned(2)));
static struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[VQ_SIZE]; uint16_t avail_event; } vq_used __attribute__((aligned(4)));
static struct { uint32_t type, reserved; uint64_t sector; } blk_header;
static uint8_t blk_data[4096] __attribute__((aligned(4096)));
static volatile uint8_t blk_status;

static uint64_t parse_hex(const char *s) {
    uint64_t v = 0;
    if (s[0] == '0' && s[1] == 'x') s += 2;
    for (;; s++) {
        if (*s >= '0' && *s <= '9') v = v * 16 + (uint64_t)(*s - '0');
        else if (*s >= 'a' && *s <= 'f') v = v * 16 + (uint64_t)(*s - 'a' + 10);
        else return v;
    }
}

/* The queue the vq_* rings are set up as: 0, or with queue=N on the command line (virtio-blk with
 * VIRTIO_BLK_F_MQ) queue N, the others left unused, as a driver may. */
static uint32_t vq_index;
static uint32_t blk_queue_count = 1;

/* Makes the chain starting at descriptor 0 available, notifies the queue and polls until the
 * device has used it; returns the length the device reported. */
static uint32_t vq_submit_and_wait(uintptr_t base) {
    uint16_t seen = vq_used.idx;
    vq_avail.ring[vq_avail.idx % VQ_SIZE] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    vq_avail.idx++;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    mmio_write32(base + 0x50, vq_index);
    while (*(volatile uint16_t *)&vq_used.idx == seen) {}
    mmio_write32(base + 0x64, mmio_read32(base + 0x60));     /* acknowledge the interrupt */
    return vq_used.ring[seen % VQ_SIZE].len;
}

static uint8_t blk_request_buffer(uintptr_t base, uint32_t type, uint64_t sector, uint8_t *buffer, uint32_t len,
                                  int device_writes) {
    blk_header.type = type; blk_header.reserved = 0; blk_header.sector = sector;
    blk_status = 0xff;
    vq_descs[0] = (struct vq_desc){ (uint64_t)&blk_header, 16, 1, 1 };
    if (len) {
        vq_descs[1] = (struct vq_desc){ (uint64_t)buffer, len, (uint16_t)(1 | (device_writes ? 2 : 0)), 2 };
    } else {
        vq_descs[0].next = 2;
    }
    vq_descs[2] = (struct vq_desc){ (uint64_t)&blk_status, 1, 2, 0 };
    vq_submit_and_wait(base);
    return blk_status;
}

static uint8_t blk_request(uintptr_t base, uint32_t type, uint64_t sector, uint32_t len, int device_writes) {
    return blk_request_buffer(base, type, sector, blk_data, len, device_writes);
}

/* The same 4 KiB request with its data in two descriptors at odd addresses (100 bytes, then
 * 3996), as no sane driver sends it: a host that needs aligned buffers (O_DIRECT) must cope. */
static uint8_t blk_split_area[4096 + 64] __attribute__((aligned(4096)));
static uint8_t blk_request_split(uintptr_t base, uint32_t type, uint64_t sector, int device_writes) {
    uint8_t *first = blk_split_area + 1, *second = blk_split_area + 1 + 100 + 7;
    if (!device_writes) { for (int i = 0; i < 100; i++) first[i] = blk_data[i]; for (int i = 100; i < 4096; i++) second[i - 100] = blk_data[i]; }
    blk_header.type = type; blk_header.reserved = 0; blk_header.sector = sector;
    blk_status = 0xff;
    uint16_t flags = (uint16_t)(1 | (device_writes ? 2 : 0));
    vq_descs[0] = (struct vq_desc){ (uint64_t)&blk_header, 16, 1, 1 };
    vq_descs[1] = (struct vq_desc){ (uint64_t)first, 100, flags, 3 };
    vq_descs[3] = (struct vq_desc){ (uint64_t)second, 3996, flags, 2 };
    vq_descs[2] = (struct vq_desc){ (uint64_t)&blk_status, 1, 2, 0 };
    vq_submit_and_wait(base);
    if (device_writes) { for (int i = 0; i < 100; i++) blk_data[i] = first[i]; for (int i = 100; i < 4096; i++) blk_data[i] = second[i - 100]; }
    return blk_status;
}

/* A discard (type 11) of `sectors` sectors at `sector`: one {sector, num_sectors, flags} segment. */
static struct { uint64_t sector; uint32_t sectors, flags; } blk_segment;
static uint8_t blk_discard(uintptr_t base, uint64_t sector, uint32_t sectors) {
    blk_segment.sector = sector; blk_segment.sectors = sectors; blk_segment.flags = 0;
    blk_header.type = 11; blk_header.reserved = 0; blk_header.sector = 0;
    blk_status = 0xff;
    vq_descs[0] = (struct vq_desc){ (uint64_t)&blk_header, 16, 1, 1 };
    vq_descs[1] = (struct vq_desc){ (uint64_t)&blk_segment, 16, 1, 2 };
    vq_descs[2] = (struct vq_desc){ (uint64_t)&blk_status, 1, 2, 0 };
    vq_submit_and_wait(base);
    return blk_status;
}

/* Brings a virtio device of type `device_id` up with one queue (the shared vq_* rings). */
static int virtio_init(uintptr_t base, uint32_t device_id, int *read_only) {
    if (mmio_read32(base) != 0x74726976 || mmio_read32(base + 4) != 2 || mmio_read32(base + 8) != device_id) return 0;
    mmio_write32(base + 0x70, 0);
    mmio_write32(base + 0x70, 1 | 2);
    mmio_write32(base + 0x14, 0); uint32_t f0 = mmio_read32(base + 0x10);
    mmio_write32(base + 0x14, 1); uint32_t f1 = mmio_read32(base + 0x10);
    *read_only = (f0 >> 5) & 1;
    /* DISCARD (13) only when the command line asks (probe=blk discard=1). */
    char wants[4];
    uint32_t discard = cmdline_value("discard", wants, sizeof wants) && wants[0] == '1' ? (1u << 13) : 0;
    /* MQ (12) for a disk when the command line names a queue other than 0 (probe=blk queue=1). */
    vq_index = 0;
    blk_queue_count = 1;
    char queue_arg[8];
    uint32_t queue = device_id == 2 && cmdline_value("queue", queue_arg, sizeof queue_arg) ? (uint32_t)parse_dec(queue_arg) : 0;
    uint32_t multiqueue = 0;
    if (queue) {
        if (!(f0 & (1u << 12))) { puts_raw(" no multiqueue offered"); return 0; }
        blk_queue_count = mmio_read32(base + 0x100 + 32) >> 16;    /* num_queues, config offset 34 */
        if (queue >= blk_queue_count) { puts_raw(" queue beyond num_queues"); return 0; }
        multiqueue = 1u << 12;
        vq_index = queue;
    }
    mmio_write32(base + 0x24, 0); mmio_write32(base + 0x20, f0 & ((1u << 5) | (1u << 9) | discard | multiqueue));
    mmio_write32(base + 0x24, 1); mmio_write32(base + 0x20, f1 & 1);   /* VERSION_1 */
    mmio_write32(base + 0x70, 1 | 2 | 8);
    if (!(mmio_read32(base + 0x70) & 8)) { puts_raw(" features refused"); return 0; }
    mmio_write32(base + 0x30, vq_index);
    mmio_write32(base + 0x38, VQ_SIZE);
    vq_avail.idx = 0; vq_used.idx = 0;
    mmio_write32(base + 0x80, (uint32_t)(uintptr_t)vq_descs); mmio_write32(base + 0x84, 0);
    mmio_write32(base + 0x90, (uint32_t)(uintptr_t)&vq_avail); mmio_write32(base + 0x94, 0);
    mmio_write32(base + 0xa0, (uint32_t)(uintptr_t)&vq_used); mmio_write32(base + 0xa4, 0);
    mmio_write32(base + 0x44, 1);
    mmio_write32(base + 0x70, 1 | 2 | 8 | 4);
    return 1;
}

/* A virtio-blk device's capacity in sectors once it is up, or 0. */
static uint64_t blk_init(uintptr_t base, int *read_only) {
    if (!virtio_init(base, 2, read_only)) { puts_raw(" not a usable virtio-blk device\n"); return 0; }
    return mmio_read32(base + 0x100) | ((uint64_t)mmio_read32(base + 0x104) << 32);
}

/* Calls visit(base) for every virtio_mmio.device=SIZE@BASE:IRQ on the command line, in order;
 * returns how many there were. */
/* virtio-mmio devices from the DSDT (each LNRO0005's Memory32Fixed base) with ACPI, else from
 * the command line's virtio_mmio.device= entries. */
static int for_each_virtio_device(void (*visit)(int index, uintptr_t base)) {
    int index = 0;
    if (parse_acpi()) {
        const uint8_t *d = (const uint8_t *)acpi.dsdt;
        const uint8_t *end = d + acpi.dsdt_length;
        for (const uint8_t *p = d + 36; (p = find_bytes(p, end, "LNRO0005", 8)); p += 8) {
            for (const uint8_t *q = p; q + 12 <= end; q++)
                if (q[0] == 0x86 && q[1] == 0x09 && q[2] == 0) { visit(index++, *(const uint32_t *)(q + 4)); break; }
        }
        return index;
    }
    const char *s = cmdline;
    while (*s) {
        while (*s == ' ') s++;
        if (starts_with(s, "virtio_mmio.device=")) {
            const char *at = s;
            while (*at && *at != '@' && *at != ' ') at++;
            if (*at == '@') visit(index++, (uintptr_t)parse_hex(at + 1));
        }
        while (*s && *s != ' ') s++;
    }
    return index;
}

/* probe=rng: two 64-byte reads from every virtio-rng device on the command line. */
static int rng_found;
static void probe_rng_device(int index, uintptr_t base) {
    (void)index;
    int unused;
    if (!virtio_init(base, 4, &unused)) return;
    static uint8_t first[64];
    uint32_t lengths[2];
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < 64; i++) blk_data[i] = 0;
        vq_descs[0] = (struct vq_desc){ (uint64_t)blk_data, 64, 2, 0 };
        lengths[round] = vq_submit_and_wait(base);
        if (round == 0) for (int i = 0; i < 64; i++) first[i] = blk_data[i];
    }
    int differ = 0, nonzero = 0;
    for (int i = 0; i < 64; i++) { if (first[i] != blk_data[i]) differ = 1; if (blk_data[i]) nonzero = 1; }
    puts_raw("rng: read="); put_dec(lengths[0]); puts_raw(" read2="); put_dec(lengths[1]);
    puts_raw(" differ="); put_dec((uint64_t)differ); puts_raw(" nonzero="); put_dec((uint64_t)nonzero); puts_raw("\n");
    rng_found++;
}

static void probe_rng(void) {
    for_each_virtio_device(probe_rng_device);
    puts_raw("rng: devices="); put_dec((uint64_t)rng_found); puts_raw("\n");
}

static void probe_blk_device(int index, uintptr_t base) {
    lock();
    puts_raw("blk: dev="); put_dec((uint64_t)index);
    int read_only = 0;
    uint64_t capacity = blk_init(base, &read_only);
    if (!capacity) { unlock(); return; }
    puts_raw(" capacity="); put_dec(capacity); puts_raw(" ro="); put_dec((uint64_t)read_only);
    if (vq_index) { puts_raw(" queue="); put_dec(vq_index); puts_raw(" of "); put_dec(blk_queue_count); }

    for (int i = 0; i < 21; i++) blk_data[i] = 0;
    uint8_t st = blk_request(base, 8, 0, 20, 1);
    blk_data[20] = 0;
    puts_raw(" id_status="); put_dec(st); puts_raw(" serial="); puts_raw((const char *)blk_data);

    char arg[24];
    uint64_t sector = cmdline_value("sector", arg, sizeof arg) ? parse_dec(arg) : 8;
    uint8_t seed = cmdline_value("seed", arg, sizeof arg) ? (uint8_t)parse_dec(arg) : 0x5a;
    int split = cmdline_value("split", arg, sizeof arg) && arg[0] == '1';
    for (int i = 0; i < 4096; i++) blk_data[i] = (uint8_t)(i * 13 + seed);
    st = split ? blk_request_split(base, 1, sector, 0) : blk_request(base, 1, sector, 4096, 0);
    puts_raw(" write_status="); put_dec(st);
    st = blk_request(base, 4, 0, 0, 0);
    puts_raw(" flush_status="); put_dec(st);
    for (int i = 0; i < 4096; i++) blk_data[i] = 0;
    st = split ? blk_request_split(base, 0, sector, 1) : blk_request(base, 0, sector, 4096, 1);
    int match = 1;
    for (int i = 0; i < 4096; i++) if (blk_data[i] != (uint8_t)(i * 13 + seed)) match = 0;
    puts_raw(" read_status="); put_dec(st); puts_raw(" match="); put_dec((uint64_t)match);
    st = blk_request(base, 0, capacity, 512, 1);
    puts_raw(" beyond_end_status="); put_dec(st);
    if (cmdline_value("discard", arg, sizeof arg) && arg[0] == '1' && !read_only) {
        /* The block just written is discarded, flushed and read again: zeros where the host
         * freed it (a file's hole, a loop device's backing file), else whatever the device keeps. */
        st = blk_discard(base, sector, 8);
        puts_raw(" discard_status="); put_dec(st);
        st = blk_request(base, 4, 0, 0, 0);
        for (int i = 0; i < 4096; i++) blk_data[i] = 0xee;
        blk_request(base, 0, sector, 4096, 1);
        int zero = 1;
        for (int i = 0; i < 4096; i++) if (blk_data[i]) zero = 0;
        puts_raw(" zero_after_discard="); put_dec((uint64_t)zero);
    }
    puts_raw("\n");
    unlock();
}

static void probe_blk(void) {
    int count = for_each_virtio_device(probe_blk_device);
    puts_raw("blk: devices="); put_dec((uint64_t)count); puts_raw("\n");
}

/* probe=blkloop count=N [readback=1]: writes 4 KiB block i (pattern seeded by i) at sector 8*i,
 * flushing after every 8 blocks and reporting each flush, so a test can kill the VMM mid-stream and
 * check that everything acknowledged by a flush is in the image; readback=1 also reads block i/2
 * back after each flush and stops at a mismatch. */
static uintptr_t first_virtio_base;
static void remember_first(int index, uintptr_t base) { if (index == 0) first_virtio_base = base; }
/* The first virtio-mmio device's window (the first disk when disks are attached), or 0. */
static uintptr_t first_virtio_device(void) {
    first_virtio_base = 0;
    for_each_virtio_device(remember_first);
    return first_virtio_base;
}

static void probe_blkloop(void) {
    char arg[24];
    uint64_t count = cmdline_value("count", arg, sizeof arg) ? parse_dec(arg) : 1000;
    int readback = cmdline_value("readback", arg, sizeof arg) && parse_dec(arg) != 0;
    uintptr_t base = first_virtio_device();
    if (!base) { puts_raw("blkloop: no disk\n"); return; }
    int read_only = 0;
    puts_raw("blkloop:");
    if (!blk_init(base, &read_only)) return;
    puts_raw(" ready\n");
    for (uint64_t i = 0; i < count; i++) {
        for (int j = 0; j < 4096; j++) blk_data[j] = (uint8_t)(j * 13 + (int)i);
        if (blk_request(base, 1, 8 * i, 4096, 0) != 0) { puts_raw("blkloop: write failed\n"); return; }
        if (i % 8 == 7) {
            if (blk_request(base, 4, 0, 0, 0) != 0) { puts_raw("blkloop: flush failed\n"); return; }
            puts_raw("blkloop: flushed "); put_dec(i + 1); puts_raw("\n");
            /* readback=1: block i/2, written long before (on another host, after a migration), read back. */
            if (readback) {
                uint64_t old = i / 2;
                if (blk_request(base, 0, 8 * old, 4096, 1) != 0) { puts_raw("blkloop: read failed\n"); return; }
                for (int j = 0; j < 4096; j++) {
                    if (blk_data[j] != (uint8_t)(j * 13 + (int)old)) { puts_raw("blkloop: readback mismatch at block "); put_dec(old); puts_raw("\n"); return; }
                }
            }
        }
    }
    puts_raw("blkloop: finished\n");
}

/* probe=blkbench count=N: virtio-blk throughput from ring 3 (native speed on the emulated test
 * hosts), one request in flight: the whole disk in 1 MiB sequential writes then reads, then N
 * random 4 KiB writes and reads. The host times the phases from the start/done lines. */
static uint8_t bench_buffer[1 << 20] __attribute__((aligned(4096)));
static uintptr_t bench_base;
static uint64_t bench_sectors;

static void bench_phase(const char *name, uint32_t type, int random, uint64_t count, uint32_t length) {
    puts_raw("blkbench: "); puts_raw(name); puts_raw(" start\n");
    uint64_t state = 88172645463325252ull;
    uint64_t blocks = bench_sectors / (length / 512);
    for (uint64_t i = 0; i < count; i++) {
        uint64_t block = i;
        if (random) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; block = state % blocks; }
        if (blk_request_buffer(bench_base, type, block * (length / 512), bench_buffer, length, type == 0) != 0) {
            puts_raw("blkbench: request failed\n");
            finish();
        }
    }
    puts_raw("blkbench: "); puts_raw(name); puts_raw(" done\n");
}

static void user_blkbench(uint64_t count) {
    for (int i = 0; i < (1 << 20); i++) bench_buffer[i] = (uint8_t)(i * 7);
    uint64_t mebibytes = bench_sectors / 2048;
    bench_phase("seqwrite", 1, 0, mebibytes, 1 << 20);
    blk_request_buffer(bench_base, 4, 0, bench_buffer, 0, 0);
    bench_phase("seqread", 0, 0, mebibytes, 1 << 20);
    bench_phase("randwrite", 1, 1, count, 4096);
    blk_request_buffer(bench_base, 4, 0, bench_buffer, 0, 0);
    bench_phase("randread", 0, 1, count, 4096);
    finish();
}

static void probe_blkbench(void) {
    bench_base = first_virtio_device();
    if (!bench_base) { puts_raw("blkbench: no disk\n"); return; }
    int read_only = 0;
    puts_raw("blkbench:");
    bench_sectors = blk_init(bench_base, &read_only);
    if (!bench_sectors) return;
    puts_raw(" ready\n");
    char arg[24];
    uint64_t count = cmdline_value("count", arg, sizeof arg) ? parse_dec(arg) : 2000;
    enter_user_mode(user_blkbench, count);
}

/* ---- probe=net count=N: a minimal polled virtio-net driver (virtio 1.x §5.1). From ring 3 it
 * broadcasts Ethernet frames of type 0x88b5 ("vireo-ping N") until a frame of that type comes
 * back saying "vireo-pong", and reports what came back. ---- */
#define NQ 8
/* One split virtqueue of NQ entries: descriptor table, available ring, used ring. */
struct vring8 {
    struct vq_desc desc[NQ];
    struct { uint16_t flags, idx, ring[NQ], used_event; } avail;
    struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[NQ]; uint16_t avail_event; } used __attribute__((aligned(4)));
} __attribute__((aligned(16)));
static struct vring8 net_rx, net_tx;
static uint8_t net_rx_buffers[NQ][2048] __attribute__((aligned(4096)));
static uint8_t net_tx_buffer[2048] __attribute__((aligned(64)));
static uint32_t net_features;
static uint8_t net_mac[6];
static uintptr_t net_base;

/* Makes descriptor chain `head` available to the device (ordering as virtio 1.x §2.7.13). */
static void ring_offer(struct vring8 *ring, uint16_t head) {
    ring->avail.ring[ring->avail.idx % NQ] = head;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    ring->avail.idx++;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void ring_setup(uintptr_t base, uint32_t index, struct vring8 *ring, uint32_t size) {
    mmio_write32(base + 0x30, index);
    mmio_write32(base + 0x38, size);
    mmio_write32(base + 0x80, (uint32_t)(uintptr_t)ring->desc); mmio_write32(base + 0x84, 0);
    mmio_write32(base + 0x90, (uint32_t)(uintptr_t)&ring->avail); mmio_write32(base + 0x94, 0);
    mmio_write32(base + 0xa0, (uint32_t)(uintptr_t)&ring->used); mmio_write32(base + 0xa4, 0);
    mmio_write32(base + 0x44, 1);
}

static void put_mac(const uint8_t *m) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) { if (i) putc_raw(':'); putc_raw(hex[m[i] >> 4]); putc_raw(hex[m[i] & 15]); }
}

static void probe_net_device(int index, uintptr_t base) {
    (void)index;
    if (net_base || mmio_read32(base) != 0x74726976 || mmio_read32(base + 8) != 1) return;
    mmio_write32(base + 0x70, 0);
    mmio_write32(base + 0x70, 1 | 2);
    mmio_write32(base + 0x14, 0); uint32_t f0 = mmio_read32(base + 0x10);
    mmio_write32(base + 0x14, 1); uint32_t f1 = mmio_read32(base + 0x10);
    /* tso=1: checksum and TCP segmentation offloads both ways and mergeable receive buffers. */
    char tso[4];
    uint32_t want = (1u << 5) | (1u << 16);
    if (cmdline_value("tso", tso, sizeof tso) && tso[0] == '1') want |= (1u << 0) | (1u << 1) | (1u << 7) | (1u << 11) | (1u << 15);
    net_features = f0 & want;
    mmio_write32(base + 0x24, 0); mmio_write32(base + 0x20, net_features);
    mmio_write32(base + 0x24, 1); mmio_write32(base + 0x20, f1 & 1);
    mmio_write32(base + 0x70, 1 | 2 | 8);
    if (!(mmio_read32(base + 0x70) & 8)) { puts_raw("net: features refused\n"); return; }
    ring_setup(base, 0, &net_rx, NQ);
    ring_setup(base, 1, &net_tx, NQ);
    mmio_write32(base + 0x70, 1 | 2 | 8 | 4);
    for (int i = 0; i < 6; i++) net_mac[i] = *(volatile uint8_t *)(base + 0x100 + i);
    uint16_t link = *(volatile uint16_t *)(base + 0x106);
    for (int i = 0; i < NQ; i++) {
        net_rx.desc[i] = (struct vq_desc){ (uint64_t)net_rx_buffers[i], sizeof net_rx_buffers[i], 2, 0 };
        net_rx.avail.ring[i] = (uint16_t)i;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    net_rx.avail.idx = NQ;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    mmio_write32(base + 0x50, 0);
    puts_raw("net: mac="); put_mac(net_mac); puts_raw(" link="); put_dec(link & 1); puts_raw("\n");
    if (want != ((1u << 5) | (1u << 16))) { puts_raw("net: features="); put_hex(net_features); puts_raw("\n"); }
    net_base = base;
}

static void user_net(uint64_t count) {
    uintptr_t base = net_base;
    static const char ping[] = "vireo-ping ";
    uint16_t rx_seen = 0;
    for (uint64_t attempt = 0; attempt < count; attempt++) {
        uint8_t *f = net_tx_buffer;
        for (int i = 0; i < 12; i++) f[i] = 0;
        uint8_t *eth = f + 12;
        for (int i = 0; i < 6; i++) { eth[i] = 0xff; eth[6 + i] = net_mac[i]; }
        eth[12] = 0x88; eth[13] = 0xb5;
        int n = 0;
        for (; ping[n]; n++) eth[14 + n] = (uint8_t)ping[n];
        eth[14 + n++] = (uint8_t)('0' + attempt % 10);
        uint16_t tx_seen = net_tx.used.idx;
        net_tx.desc[0] = (struct vq_desc){ (uint64_t)f, (uint32_t)(12 + 14 + n), 0, 0 };
        ring_offer(&net_tx, (uint16_t)0);
        mmio_write32(base + 0x50, 1);
        while (*(volatile uint16_t *)&net_tx.used.idx == tx_seen) {}
        for (volatile uint64_t spin = 0; spin < 30000000; spin++) {
            if (*(volatile uint16_t *)&net_rx.used.idx == rx_seen) continue;
            uint32_t id = net_rx.used.ring[rx_seen % NQ].id, len = net_rx.used.ring[rx_seen % NQ].len;
            rx_seen++;
            uint8_t *r = net_rx_buffers[id % NQ] + 12;
            int pong = len > 12 + 14 + 10 && r[12] == 0x88 && r[13] == 0xb5 && starts_with((const char *)r + 14, "vireo-pong");
            if (pong) {
                r[len - 12 < 200 ? len - 12 : 200] = 0;
                puts_raw("net: reply from "); put_mac(r + 6); puts_raw(" to "); put_mac(r);
                puts_raw(" payload="); puts_raw((const char *)r + 14); puts_raw(" after "); put_dec(attempt + 1); puts_raw(" pings\n");
                finish();
            }
            /* Not ours (IPv6 router solicitations and the like): give the buffer back. */
            ring_offer(&net_rx, (uint16_t)id);
            mmio_write32(base + 0x50, 0);
        }
    }
    puts_raw("net: no reply after "); put_dec(count); puts_raw(" pings\n");
    finish();
}

static void probe_net(void) {
    for_each_virtio_device(probe_net_device);
    if (!net_base) { puts_raw("net: no virtio-net device\n"); return; }
    char n[24];
    uint64_t count = cmdline_value("count", n, sizeof n) ? parse_dec(n) : 200;
    enter_user_mode(user_net, count);
}

/* ---- probe=ip: ARP, IPv4, UDP, a DHCP client and a small TCP echo server at ring 3, on the
 * virtio-net driver above, so network tests need no guest user space (which cannot make system
 * calls on this host). Command line:
 *   addr=A.B.C.D/N [gw=G]    a static address; without it, DHCP (prints the lease)
 *   send=IP:PORT             send "vireo-udp N" there over UDP until an answer comes back
 *   serve=PORT               echo UDP datagrams and TCP data on PORT ("echo:" + data), forever
 *   tries=N                  attempts for send= (one a second) ---- */
static uint32_t ip_self, ip_mask, ip_gateway, ip_server;
static uint16_t ip_id;
static uint16_t ip_rx_seen;

static uint64_t rdtsc_now(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
/* Roughly one second of TSC: the probe only needs "a while", not exact time. */
#define TSC_SECOND 2000000000ull

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v; }

static void put_ip(uint32_t a) { put_dec(a >> 24); putc_raw('.'); put_dec(a >> 16 & 255); putc_raw('.'); put_dec(a >> 8 & 255); putc_raw('.'); put_dec(a & 255); }
static int parse_ip(const char *s, uint32_t *out, const char **end) {
    uint32_t a = 0;
    for (int i = 0; i < 4; i++) {
        if (*s < '0' || *s > '9') return 0;
        uint32_t part = 0;
        while (*s >= '0' && *s <= '9') part = part * 10 + (uint32_t)(*s++ - '0');
        if (part > 255) return 0;
        a = a << 8 | part;
        if (i < 3) { if (*s != '.') return 0; s++; }
    }
    *out = a; if (end) *end = s;
    return 1;
}

static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t n) {
    for (uint32_t i = 0; i + 1 < n; i += 2) sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1) sum += (uint32_t)(p[n - 1] << 8);
    return sum;
}
static uint16_t csum_fold(uint32_t sum) { while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16); return (uint16_t)~sum; }

/* Sends the Ethernet frame of `len` bytes already in net_tx_buffer + 12. */
/* Sends `buffer`: a 12-byte virtio-net header, then an Ethernet frame of `len` bytes. */
static void eth_send_buffer(uint8_t *buffer, uint32_t len) {
    uint16_t tx_seen = net_tx.used.idx;
    net_tx.desc[0] = (struct vq_desc){ (uint64_t)buffer, 12 + len, 0, 0 };
    ring_offer(&net_tx, 0);
    mmio_write32(net_base + 0x50, 1);
    while (*(volatile uint16_t *)&net_tx.used.idx == tx_seen) {}
}
static void eth_send(uint32_t len) {
    for (int i = 0; i < 12; i++) net_tx_buffer[i] = 0;
    eth_send_buffer(net_tx_buffer, len);
}

/* The next received frame (Ethernet header on), or 0 when none arrives before `deadline`. The
 * caller hands the buffer back with rx_release. */
#define RX_MERGED 0xffffu
/* A frame that came in several mergeable buffers, put back together; and the largest seen. */
static uint8_t rx_merged[NQ * 2048];
static uint32_t rx_largest_frame, rx_largest_buffers;
static void rx_release(uint32_t id) { if (id != RX_MERGED) { ring_offer(&net_rx, (uint16_t)id); mmio_write32(net_base + 0x50, 0); } }
static uint8_t *rx_next(uint32_t *len, uint32_t *id, uint64_t deadline) {
    while (rdtsc_now() < deadline) {
        if (*(volatile uint16_t *)&net_rx.used.idx == ip_rx_seen) continue;
        *id = net_rx.used.ring[ip_rx_seen % NQ].id % NQ;
        uint32_t l = net_rx.used.ring[ip_rx_seen % NQ].len;
        ip_rx_seen++;
        if (l > sizeof net_rx_buffers[0]) l = sizeof net_rx_buffers[0];
        *len = l > 12 ? l - 12 : 0;
        uint16_t buffers = (uint16_t)(net_rx_buffers[*id][10] | net_rx_buffers[*id][11] << 8);
        if (!(net_features & (1u << 15)) || buffers <= 1) {
            if (*len > rx_largest_frame) { rx_largest_frame = *len; rx_largest_buffers = 1; }
            return net_rx_buffers[*id] + 12;
        }
        /* num_buffers > 1: the rest of the frame follows in the next used buffers. */
        uint32_t total = *len;
        for (uint32_t i = 0; i < *len; i++) rx_merged[i] = net_rx_buffers[*id][12 + i];
        rx_release(*id);
        for (uint16_t k = 1; k < buffers && k < NQ; k++) {
            while (*(volatile uint16_t *)&net_rx.used.idx == ip_rx_seen) {}
            uint32_t next = net_rx.used.ring[ip_rx_seen % NQ].id % NQ, more = net_rx.used.ring[ip_rx_seen % NQ].len;
            ip_rx_seen++;
            if (more > sizeof net_rx_buffers[0]) more = sizeof net_rx_buffers[0];
            for (uint32_t i = 0; i < more && total < sizeof rx_merged; i++) rx_merged[total++] = net_rx_buffers[next][i];
            rx_release(next);
        }
        if (total > rx_largest_frame) { rx_largest_frame = total; rx_largest_buffers = buffers; }
        *len = total;
        *id = RX_MERGED;
        return rx_merged;
    }
    return 0;
}

static void eth_header(uint8_t *f, const uint8_t *dst, uint16_t type) {
    for (int i = 0; i < 6; i++) { f[i] = dst[i]; f[6 + i] = net_mac[i]; }
    put16(f + 12, type);
}

/* Answers ARP requests for our address; true if the frame was ARP (handled). */
static int arp_handle(const uint8_t *f, uint32_t len) {
    if (len < 42 || be16(f + 12) != 0x0806) return 0;
    const uint8_t *a = f + 14;
    if (be16(a + 6) == 1 && ip_self && be32(a + 24) == ip_self) {
        uint8_t *o = net_tx_buffer + 12;
        eth_header(o, a + 8, 0x0806);
        uint8_t *r = o + 14;
        put16(r, 1); put16(r + 2, 0x0800); r[4] = 6; r[5] = 4; put16(r + 6, 2);
        for (int i = 0; i < 6; i++) { r[8 + i] = net_mac[i]; r[18 + i] = a[8 + i]; }
        put32(r + 14, ip_self); put32(r + 24, be32(a + 14));
        eth_send(42);
    }
    return 1;
}

/* The MAC of `ip` (or of the gateway, off-link), by ARP; 0 if nobody answers. */
static int arp_resolve(uint32_t ip, uint8_t *mac) {
    uint32_t hop = ((ip ^ ip_self) & ip_mask) && ip_gateway ? ip_gateway : ip;
    static const uint8_t broadcast[6] = { 255, 255, 255, 255, 255, 255 };
    for (int attempt = 0; attempt < 5; attempt++) {
        uint8_t *o = net_tx_buffer + 12;
        eth_header(o, broadcast, 0x0806);
        uint8_t *r = o + 14;
        put16(r, 1); put16(r + 2, 0x0800); r[4] = 6; r[5] = 4; put16(r + 6, 1);
        for (int i = 0; i < 6; i++) { r[8 + i] = net_mac[i]; r[18 + i] = 0; }
        put32(r + 14, ip_self); put32(r + 24, hop);
        eth_send(42);
        uint64_t deadline = rdtsc_now() + TSC_SECOND;
        uint32_t len, id;
        uint8_t *f;
        while ((f = rx_next(&len, &id, deadline))) {
            int reply = len >= 42 && be16(f + 12) == 0x0806 && be16(f + 20) == 2 && be32(f + 28) == hop;
            if (reply) for (int i = 0; i < 6; i++) mac[i] = f[22 + i];
            if (!reply) arp_handle(f, len);
            rx_release(id);
            if (reply) return 1;
        }
    }
    return 0;
}

/* Builds IPv4 + UDP/TCP around `payload` in net_tx_buffer and sends it to `dst_mac`. */
static void ip_send(const uint8_t *dst_mac, uint32_t dst, uint8_t proto, const uint8_t *l4, uint32_t l4_len) {
    uint8_t *o = net_tx_buffer + 12;
    eth_header(o, dst_mac, 0x0800);
    uint8_t *h = o + 14;
    h[0] = 0x45; h[1] = 0; put16(h + 2, (uint16_t)(20 + l4_len)); put16(h + 4, ip_id++); put16(h + 6, 0x4000);
    h[8] = 64; h[9] = proto; put16(h + 10, 0); put32(h + 12, ip_self); put32(h + 16, dst);
    put16(h + 10, csum_fold(csum_add(0, h, 20)));
    uint8_t *t = h + 20;
    for (uint32_t i = 0; i < l4_len; i++) t[i] = l4[i];
    /* Checksum over the pseudo header and the segment; its field sits at 6 (UDP) or 16 (TCP). */
    uint32_t at = proto == 17 ? 6 : 16;
    put16(t + at, 0);
    uint8_t pseudo[12];
    put32(pseudo, ip_self); put32(pseudo + 4, dst); pseudo[8] = 0; pseudo[9] = proto; put16(pseudo + 10, (uint16_t)l4_len);
    uint16_t sum = csum_fold(csum_add(csum_add(0, pseudo, 12), t, l4_len));
    put16(t + at, proto == 17 && sum == 0 ? 0xffff : sum);
    eth_send(14 + 20 + l4_len);
}

static void udp_send(const uint8_t *mac, uint32_t dst, uint16_t sport, uint16_t dport, const uint8_t *data, uint32_t n) {
    static uint8_t seg[1500];
    put16(seg, sport); put16(seg + 2, dport); put16(seg + 4, (uint16_t)(8 + n)); put16(seg + 6, 0);
    for (uint32_t i = 0; i < n; i++) seg[8 + i] = data[i];
    ip_send(mac, dst, 17, seg, 8 + n);
}

/* An IPv4 packet for us (or broadcast): its header, or 0. */
static const uint8_t *ip_packet(const uint8_t *f, uint32_t len, uint8_t proto) {
    if (len < 34 || be16(f + 12) != 0x0800) return 0;
    const uint8_t *h = f + 14;
    if ((h[0] >> 4) != 4 || h[9] != proto || (uint32_t)(h[0] & 15) * 4 + 8 > len - 14) return 0;
    uint32_t dst = be32(h + 16);
    if (ip_self && dst != ip_self && dst != 0xffffffff) return 0;
    return h;
}

/* ---- DHCP (RFC 2131): DISCOVER, OFFER, REQUEST, ACK ---- */
static uint32_t dhcp_exchange(uint8_t type, uint32_t xid, uint32_t requested, uint32_t server, uint8_t want) {
    static const uint8_t broadcast[6] = { 255, 255, 255, 255, 255, 255 };
    static uint8_t m[300];
    for (int i = 0; i < 300; i++) m[i] = 0;
    m[0] = 1; m[1] = 1; m[2] = 6; put32(m + 4, xid); put16(m + 10, 0x8000);
    for (int i = 0; i < 6; i++) m[28 + i] = net_mac[i];
    put32(m + 236, 0x63825363);
    uint8_t *o = m + 240;
    *o++ = 53; *o++ = 1; *o++ = type;
    if (requested) { *o++ = 50; *o++ = 4; put32(o, requested); o += 4; }
    if (server) { *o++ = 54; *o++ = 4; put32(o, server); o += 4; }
    *o++ = 55; *o++ = 3; *o++ = 1; *o++ = 3; *o++ = 6;
    *o++ = 255;
    for (int attempt = 0; attempt < 8; attempt++) {
        udp_send(broadcast, 0xffffffff, 68, 67, m, (uint32_t)(o - m));
        uint64_t deadline = rdtsc_now() + 2 * TSC_SECOND;
        uint32_t len, id;
        uint8_t *f;
        while ((f = rx_next(&len, &id, deadline))) {
            const uint8_t *h = ip_packet(f, len, 17);
            uint32_t answer = 0;
            if (h) {
                const uint8_t *u = h + (h[0] & 15) * 4;
                const uint8_t *b = u + 8;
                uint32_t blen = (uint32_t)(f + len - b);
                if (be16(u + 2) == 68 && blen >= 240 && b[0] == 2 && be32(b + 4) == xid && be32(b + 236) == 0x63825363) {
                    uint8_t kind = 0;
                    uint32_t mask = 0, router = 0, id54 = 0;
                    for (uint32_t i = 240; i < blen && b[i] != 255;) {
                        if (b[i] == 0) { i++; continue; }
                        if (i + 1 >= blen || i + 2 + b[i + 1] > blen) break;
                        const uint8_t *v = b + i + 2;
                        if (b[i] == 53) kind = v[0];
                        if (b[i] == 1 && b[i + 1] >= 4) mask = be32(v);
                        if (b[i] == 3 && b[i + 1] >= 4) router = be32(v);
                        if (b[i] == 54 && b[i + 1] >= 4) id54 = be32(v);
                        i += 2 + b[i + 1];
                    }
                    if (kind == want) { answer = be32(b + 16); ip_mask = mask; ip_gateway = router; ip_server = id54; }
                }
            }
            rx_release(id);
            if (answer) return answer;
        }
    }
    return 0;
}

static int dhcp_client(void) {
    uint32_t xid = (uint32_t)rdtsc_now() ^ be32(net_mac + 2);
    uint32_t offered = dhcp_exchange(1, xid, 0, 0, 2);
    if (!offered) { puts_raw("ip: no DHCP offer\n"); return 0; }
    uint32_t server = ip_server;
    uint32_t acked = dhcp_exchange(3, xid, offered, server, 5);
    if (!acked) { puts_raw("ip: no DHCP ack\n"); return 0; }
    ip_self = acked;
    puts_raw("ip: dhcp address="); put_ip(ip_self); puts_raw(" mask="); put_ip(ip_mask);
    puts_raw(" router="); put_ip(ip_gateway); puts_raw(" server="); put_ip(ip_server); puts_raw("\n");
    return 1;
}

/* ---- send=IP:PORT ---- */
static void ip_udp_ping(uint32_t dst, uint16_t port, uint64_t tries) {
    uint8_t mac[6];
    if (!arp_resolve(dst, mac)) { puts_raw("ip: no ARP answer for the next hop to "); put_ip(dst); puts_raw("\n"); return; }
    for (uint64_t attempt = 0; attempt < tries; attempt++) {
        static const char text[] = "vireo-udp ";
        uint8_t data[16];
        int n = 0;
        for (; text[n]; n++) data[n] = (uint8_t)text[n];
        data[n++] = (uint8_t)('0' + attempt % 10);
        udp_send(mac, dst, 40000, port, data, (uint32_t)n);
        uint64_t deadline = rdtsc_now() + TSC_SECOND;
        uint32_t len, id;
        uint8_t *f;
        while ((f = rx_next(&len, &id, deadline))) {
            if (arp_handle(f, len)) { rx_release(id); continue; }
            const uint8_t *h = ip_packet(f, len, 17);
            if (h && be32(h + 12) == dst) {
                const uint8_t *u = h + (h[0] & 15) * 4;
                uint32_t ulen = be16(u + 4);
                if (be16(u) == port && be16(u + 2) == 40000 && ulen >= 8 && ulen - 8 < 200 && u + ulen <= f + len) {
                    char reply[208];
                    for (uint32_t i = 0; i < ulen - 8; i++) reply[i] = (char)u[8 + i];
                    reply[ulen - 8] = 0;
                    puts_raw("ip: udp reply from "); put_ip(dst); putc_raw(':'); put_dec(port); puts_raw(" payload="); puts_raw(reply);
                    puts_raw(" after "); put_dec(attempt + 1); puts_raw(" tries\n");
                    rx_release(id);
                    return;
                }
            }
            rx_release(id);
        }
    }
    puts_raw("ip: no udp reply from "); put_ip(dst); putc_raw(':'); put_dec(port); puts_raw(" after "); put_dec(tries); puts_raw(" tries\n");
}

/* ---- offloads (tso=1): one TCP segment of many MSS handed over whole, with a partial checksum ---- */
static uint8_t net_big_tx[12 + 14 + 20 + 20 + 65536] __attribute__((aligned(64)));

/* Builds IPv4 + TCP with `n` payload bytes ('a'..'z') in net_big_tx behind a virtio-net header
 * asking the device for checksum (NEEDS_CSUM) and segmentation (GSO_TCPV4, 1400-byte segments),
 * or, without tso, an ordinary header and a complete checksum. Returns the frame's length. */
static uint32_t tcp_build(const uint8_t *mac, uint32_t dst, uint16_t sport, uint16_t dport, uint32_t seq, uint32_t ack, uint32_t n, int tso) {
    uint8_t *b = net_big_tx;
    for (int i = 0; i < 12; i++) b[i] = 0;
    if (tso) {
        b[0] = 1; b[1] = 1;                  /* flags NEEDS_CSUM, gso_type TCPV4 */
        b[2] = 54;                           /* hdr_len */
        b[4] = 1400 & 255; b[5] = 1400 >> 8; /* gso_size */
        b[6] = 34; b[8] = 16;                /* csum_start, csum_offset */
    }
    uint8_t *o = b + 12;
    eth_header(o, mac, 0x0800);
    uint8_t *h = o + 14;
    h[0] = 0x45; h[1] = 0; put16(h + 2, (uint16_t)(40 + n)); put16(h + 4, ip_id++); put16(h + 6, 0x4000);
    h[8] = 64; h[9] = 6; put16(h + 10, 0); put32(h + 12, ip_self); put32(h + 16, dst);
    put16(h + 10, csum_fold(csum_add(0, h, 20)));
    uint8_t *t = h + 20;
    put16(t, sport); put16(t + 2, dport); put32(t + 4, seq); put32(t + 8, ack);
    t[12] = 5 << 4; t[13] = 0x18; put16(t + 14, 8192); put16(t + 16, 0); put16(t + 18, 0);
    for (uint32_t i = 0; i < n; i++) t[20 + i] = (uint8_t)('a' + i % 26);
    uint8_t pseudo[12];
    put32(pseudo, ip_self); put32(pseudo + 4, dst); pseudo[8] = 0; pseudo[9] = 6; put16(pseudo + 10, (uint16_t)(20 + n));
    uint32_t sum = csum_add(0, pseudo, 12);
    /* Partial: the pseudo header's sum, not complemented; the device finishes it. */
    put16(t + 16, tso ? (uint16_t)~csum_fold(sum) : csum_fold(csum_add(sum, t, 20 + n)));
    return 14 + 40 + n;
}

static uint32_t append_dec(uint8_t *p, uint32_t v) {
    char digits[12]; int n = 0;
    do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    for (int i = 0; i < n; i++) p[i] = (uint8_t)digits[n - 1 - i];
    return (uint32_t)n;
}
static uint32_t append_hex8(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)"0123456789abcdef"[(v >> (28 - 4 * i)) & 15];
    return 8;
}

/* ---- blast=count size=N [tso=1]: frames to a MAC nobody has, as fast as the device takes them
 * (bench/: the VMM's transmit path alone). With tso=1, each is one TCP segment of `size` bytes
 * that the host side cuts into 1400-byte segments. ---- */
static void ip_blast(uint64_t count, uint32_t size, int tso) {
    static const uint8_t nobody[6] = { 0x02, 0, 0, 0, 0, 0x99 };
    uint32_t length;
    if (tso) {
        if (size > 65000) size = 65000;
        length = tcp_build(nobody, 0xc0000201, 40000, 9, 1, 1, size, 1);
    } else {
        if (size > 1472) size = 1472;
        uint8_t *o = net_big_tx + 12;
        for (int i = 0; i < 12; i++) net_big_tx[i] = 0;
        eth_header(o, nobody, 0x0800);
        uint8_t *h = o + 14;
        h[0] = 0x45; h[1] = 0; put16(h + 2, (uint16_t)(28 + size)); put16(h + 4, 0); put16(h + 6, 0x4000);
        h[8] = 64; h[9] = 17; put16(h + 10, 0); put32(h + 12, ip_self); put32(h + 16, 0xc0000201);
        put16(h + 10, csum_fold(csum_add(0, h, 20)));
        put16(h + 20, 40000); put16(h + 22, 9); put16(h + 24, (uint16_t)(8 + size)); put16(h + 26, 0);
        for (uint32_t i = 0; i < size; i++) h[28 + i] = (uint8_t)i;
        length = 14 + 28 + size;
    }
    puts_raw("blast: start\n");
    uint16_t done = net_tx.used.idx;
    uint64_t offered = 0, completed = 0;
    while (completed < count) {
        while (offered - completed < NQ && offered < count) {
            uint16_t slot = (uint16_t)(offered % NQ);
            net_tx.desc[slot] = (struct vq_desc){ (uint64_t)net_big_tx, 12 + length, 0, 0 };
            ring_offer(&net_tx, slot);
            offered++;
        }
        mmio_write32(net_base + 0x50, 1);
        while (*(volatile uint16_t *)&net_tx.used.idx == done) {}
        uint16_t now = *(volatile uint16_t *)&net_tx.used.idx;
        completed += (uint16_t)(now - done);
        done = now;
    }
    puts_raw("blast: done count="); put_dec(count); puts_raw(" bytes="); put_dec(count * (uint64_t)length); puts_raw("\n");
}

/* ---- sink=count: counts frames arriving until `count`, or until none for 2 s ---- */
static void ip_sink(uint64_t count) {
    puts_raw("sink: ready\n");
    uint64_t got = 0, bytes = 0;
    while (got < count) {
        uint32_t len, id;
        uint8_t *f = rx_next(&len, &id, rdtsc_now() + 2 * TSC_SECOND);
        if (!f) break;
        got++; bytes += len;
        rx_release(id);
    }
    puts_raw("sink: got "); put_dec(got); puts_raw(" frames, "); put_dec(bytes); puts_raw(" bytes\n");
}

/* ---- rtt=IP:PORT count=N: N UDP round trips, one at a time ---- */
static void ip_rtt(uint32_t dst, uint16_t port, uint64_t count) {
    uint8_t mac[6];
    if (!arp_resolve(dst, mac)) { puts_raw("rtt: no ARP answer\n"); return; }
    uint64_t lost = 0;
    puts_raw("rtt: start\n");
    for (uint64_t i = 0; i < count; i++) {
        uint8_t data[8];
        put32(data, (uint32_t)i); put32(data + 4, 0x76697265);
        udp_send(mac, dst, 40001, port, data, 8);
        uint64_t deadline = rdtsc_now() + TSC_SECOND;
        int answered = 0;
        while (!answered) {
            uint32_t len, id;
            uint8_t *f = rx_next(&len, &id, deadline);
            if (!f) break;
            if (!arp_handle(f, len)) {
                const uint8_t *h = ip_packet(f, len, 17);
                if (h && be32(h + 12) == dst) answered = 1;
            }
            rx_release(id);
        }
        if (!answered) lost++;
    }
    puts_raw("rtt: done count="); put_dec(count); puts_raw(" lost="); put_dec(lost); puts_raw("\n");
}

/* ---- serve=PORT: UDP and TCP echo, one TCP connection at a time ---- */
static void ip_serve(uint16_t port) {
    uint32_t peer = 0, snd_next = 0, rcv_next = 0;
    uint32_t bulk_bytes = 0, bulk_hash = 0;
    int bulk_started = 0;
    uint16_t peer_port = 0;
    uint8_t peer_mac[6];
    puts_raw("ip: serving tcp and udp port "); put_dec(port); puts_raw("\n");
    for (;;) {
        uint32_t len, id;
        uint8_t *f = rx_next(&len, &id, ~0ull);
        if (!f) continue;
        if (arp_handle(f, len)) { rx_release(id); continue; }
        const uint8_t *h = ip_packet(f, len, 17);
        if (h && be32(h + 16) == ip_self) {
            const uint8_t *u = h + (h[0] & 15) * 4;
            uint32_t ulen = be16(u + 4);
            if (be16(u + 2) == port && ulen >= 8 && ulen - 8 < 1000 && u + ulen <= f + len) {
                static uint8_t reply[1100];
                const char *tag = "echo:";
                uint32_t n = 0;
                for (; tag[n]; n++) reply[n] = (uint8_t)tag[n];
                for (uint32_t i = 0; i < ulen - 8; i++) reply[n++] = u[8 + i];
                uint8_t mac[6];
                for (int i = 0; i < 6; i++) mac[i] = f[6 + i];
                uint32_t src = be32(h + 12);
                uint16_t sport = be16(u);
                rx_release(id);
                udp_send(mac, src, port, sport, reply, n);
                puts_raw("ip: udp echo to "); put_ip(src); puts_raw("\n");
                continue;
            }
        }
        h = ip_packet(f, len, 6);
        if (!h || be32(h + 16) != ip_self) { rx_release(id); continue; }
        const uint8_t *t = h + (h[0] & 15) * 4;
        uint32_t total = be16(h + 2), hl = (uint32_t)(h[0] & 15) * 4, off = (uint32_t)(t[12] >> 4) * 4;
        if (be16(t + 2) != port || total < hl + off || off < 20 || h + total > f + len) { rx_release(id); continue; }
        uint8_t flags = t[13];
        uint32_t seq = be32(t + 4), data_len = total - hl - off;
        uint32_t src = be32(h + 12);
        uint16_t sport = be16(t);
        static uint8_t seg[1100];
        static uint8_t data[1000];
        uint32_t n = data_len < 900 ? data_len : 900;
        for (uint32_t i = 0; i < n; i++) data[i] = t[off + i];
        for (int i = 0; i < 6; i++) peer_mac[i] = f[6 + i];
        int big = data_len >= 3 && t[off] == 'b' && t[off + 1] == 'i' && t[off + 2] == 'g';
        /* The bulk the host sends after "big": hashed as it comes, in order. */
        if (bulk_started && src == peer && sport == peer_port && data_len && seq == rcv_next) {
            for (uint32_t i = 0; i < data_len; i++) bulk_hash = (bulk_hash ^ t[off + i]) * 16777619u;
            bulk_bytes += data_len;
        }
        rx_release(id);
        uint8_t out_flags = 0;
        uint32_t payload = 0;
        if (flags & 0x04) { peer = 0; continue; }                       /* RST */
        if (flags & 0x02) {                                             /* SYN: a new connection */
            peer = src; peer_port = sport; rcv_next = seq + 1; snd_next = (uint32_t)rdtsc_now();
            out_flags = 0x12;
            bulk_started = 0;
        } else if (src == peer && sport == peer_port) {
            if (data_len && seq == rcv_next && big && !bulk_started) {
                /* tso=1's test: 4000 bytes back as one TSO segment, then count what comes. */
                rcv_next += data_len;
                bulk_started = 1; bulk_bytes = 0; bulk_hash = 2166136261u;
                if (net_features & (1u << 11)) {
                    eth_send_buffer(net_big_tx, tcp_build(peer_mac, src, port, sport, snd_next, rcv_next, 4000, 1));
                    snd_next += 4000;
                    puts_raw("ip: sent 4000 bytes in one segment\n");
                } else {
                    /* Without TSO, segments of at most the MTU, each checksummed here. The
                     * pattern restarts in each, so the host sees 'a'.. every 1400 bytes too. */
                    for (uint32_t sent = 0; sent < 4000; sent += 1400) {
                        uint32_t n = 4000 - sent < 1400 ? 4000 - sent : 1400;
                        eth_send_buffer(net_big_tx, tcp_build(peer_mac, src, port, sport, snd_next, rcv_next, n, 0));
                        snd_next += n;
                    }
                    puts_raw("ip: sent 4000 bytes in 3 segments\n");
                }
                continue;
            } else if (data_len && seq == rcv_next && bulk_started) {
                rcv_next += data_len;
                out_flags = 0x10;
                if (bulk_bytes >= 4000) {
                    const char *tag = "ok:";
                    for (; tag[payload]; payload++) seg[20 + payload] = (uint8_t)tag[payload];
                    payload += append_dec(seg + 20 + payload, bulk_bytes);
                    seg[20 + payload++] = ':';
                    payload += append_hex8(seg + 20 + payload, bulk_hash);
                    out_flags = 0x18;
                    bulk_started = 0;
                    puts_raw("ip: bulk received "); put_dec(bulk_bytes); puts_raw(" bytes, largest frame "); put_dec(rx_largest_frame);
                    puts_raw(" in "); put_dec(rx_largest_buffers); puts_raw(" buffers\n");
                }
            } else if (data_len && seq == rcv_next) {
                rcv_next += data_len;
                const char *tag = "echo:";
                for (; tag[payload]; payload++) seg[20 + payload] = (uint8_t)tag[payload];
                for (uint32_t i = 0; i < n; i++) seg[20 + payload++] = data[i];
                out_flags = 0x18;
                puts_raw("ip: tcp echo to "); put_ip(src); puts_raw("\n");
            } else if (flags & 0x01) {                                  /* FIN */
                rcv_next = seq + data_len + 1;
                out_flags = 0x11;
            } else if (data_len) {
                out_flags = 0x10;                                       /* out of order: re-ACK */
            } else {
                continue;                                               /* a bare ACK */
            }
        } else {
            continue;
        }
        put16(seg, port); put16(seg + 2, sport); put32(seg + 4, snd_next); put32(seg + 8, rcv_next);
        seg[12] = 5 << 4; seg[13] = out_flags; put16(seg + 14, 8192); put16(seg + 16, 0); put16(seg + 18, 0);
        if (out_flags & 0x02) {
            /* MSS 1460, so the host's segments are full-sized (536 without it). */
            seg[12] = 6 << 4; seg[20] = 2; seg[21] = 4; put16(seg + 22, 1460);
            ip_send(peer_mac, src, 6, seg, 24);
        } else {
            ip_send(peer_mac, src, 6, seg, 20 + payload);
        }
        snd_next += payload + ((out_flags & 0x03) ? 1 : 0);
    }
}

static void user_ip(uint64_t unused) {
    (void)unused;
    char arg[48];
    if (cmdline_value("addr", arg, sizeof arg)) {
        const char *end;
        if (!parse_ip(arg, &ip_self, &end) || *end != '/') { puts_raw("ip: bad addr=\n"); finish(); }
        uint64_t prefix = parse_dec(end + 1);
        ip_mask = prefix ? ~0u << (32 - prefix) : 0;
        if (cmdline_value("gw", arg, sizeof arg)) parse_ip(arg, &ip_gateway, 0);
        puts_raw("ip: static address="); put_ip(ip_self); puts_raw("\n");
    } else if (!dhcp_client()) {
        finish();
    }
    uint64_t tries = cmdline_value("tries", arg, sizeof arg) ? parse_dec(arg) : 10;
    if (cmdline_value("send", arg, sizeof arg)) {
        uint32_t dst;
        const char *end;
        if (!parse_ip(arg, &dst, &end) || *end != ':') { puts_raw("ip: bad send=\n"); finish(); }
        ip_udp_ping(dst, (uint16_t)parse_dec(end + 1), tries);
    }
    if (cmdline_value("serve", arg, sizeof arg)) ip_serve((uint16_t)parse_dec(arg));
    if (cmdline_value("blast", arg, sizeof arg)) {
        uint64_t count = parse_dec(arg);
        uint32_t size = cmdline_value("size", arg, sizeof arg) ? (uint32_t)parse_dec(arg) : 1472;
        int tso = cmdline_value("tso", arg, sizeof arg) && arg[0] == '1' && (net_features & (1u << 11));
        ip_blast(count, size, tso);
    }
    if (cmdline_value("sink", arg, sizeof arg)) ip_sink(parse_dec(arg));
    if (cmdline_value("rtt", arg, sizeof arg)) {
        uint32_t dst;
        const char *end;
        if (!parse_ip(arg, &dst, &end) || *end != ':') { puts_raw("ip: bad rtt=\n"); finish(); }
        uint16_t port = (uint16_t)parse_dec(end + 1);
        ip_rtt(dst, port, cmdline_value("count", arg, sizeof arg) ? parse_dec(arg) : 1000);
    }
    finish();
}

static void probe_ip(void) {
    for_each_virtio_device(probe_net_device);
    if (!net_base) { puts_raw("net: no virtio-net device\n"); return; }
    enter_user_mode(user_ip, 0);
}

/* ---- probe=vsock: a minimal polled virtio-vsock driver (virtio 1.x §5.10). Listens on port 1234
 * and echoes what the host sends there ("echo:" + data); connects to host port 5000 and sends
 * "hello from the guest"; finishes once both directions have carried data. With stay=1 it only
 * serves port 1234, forever, and reports events (a transport reset after a restore). ---- */
struct vsock_hdr { uint64_t src_cid, dst_cid; uint32_t src_port, dst_port, len; uint16_t type, op; uint32_t flags, buf_alloc, fwd_cnt; } __attribute__((packed));
static struct vring8 vs_rx, vs_tx, vs_ev;
static uint8_t vs_rx_buffers[NQ][4096] __attribute__((aligned(4096)));
static uint8_t vs_tx_buffer[4096] __attribute__((aligned(64)));
static uint8_t vs_ev_buffer[64];
static uintptr_t vs_base;
static uint64_t vs_cid;
static uint32_t vs_fwd_cnt;
static int vs_stay;

static void probe_vsock_device(int index, uintptr_t base) {
    (void)index;
    if (vs_base || mmio_read32(base) != 0x74726976 || mmio_read32(base + 8) != 19) return;
    mmio_write32(base + 0x70, 0);
    mmio_write32(base + 0x70, 1 | 2);
    mmio_write32(base + 0x14, 1); uint32_t f1 = mmio_read32(base + 0x10);
    mmio_write32(base + 0x24, 0); mmio_write32(base + 0x20, 0);
    mmio_write32(base + 0x24, 1); mmio_write32(base + 0x20, f1 & 1);
    mmio_write32(base + 0x70, 1 | 2 | 8);
    if (!(mmio_read32(base + 0x70) & 8)) { puts_raw("vsock: features refused\n"); return; }
    ring_setup(base, 0, &vs_rx, NQ);
    ring_setup(base, 1, &vs_tx, NQ);
    ring_setup(base, 2, &vs_ev, NQ);
    mmio_write32(base + 0x70, 1 | 2 | 8 | 4);
    vs_cid = mmio_read32(base + 0x100) | ((uint64_t)mmio_read32(base + 0x104) << 32);
    for (int i = 0; i < NQ; i++) {
        vs_rx.desc[i] = (struct vq_desc){ (uint64_t)vs_rx_buffers[i], sizeof vs_rx_buffers[i], 2, 0 };
        vs_rx.avail.ring[i] = (uint16_t)i;
    }
    vs_ev.desc[0] = (struct vq_desc){ (uint64_t)vs_ev_buffer, sizeof vs_ev_buffer, 2, 0 };
    vs_ev.avail.ring[0] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    vs_rx.avail.idx = NQ;
    vs_ev.avail.idx = 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    mmio_write32(base + 0x50, 0);
    mmio_write32(base + 0x50, 2);
    puts_raw("vsock: cid="); put_dec(vs_cid); puts_raw(" listening on 1234\n");
    vs_base = base;
}

static void vsock_send(uint16_t op, uint32_t src_port, uint32_t dst_port, const char *data, uint32_t len) {
    struct vsock_hdr *h = (struct vsock_hdr *)vs_tx_buffer;
    *h = (struct vsock_hdr){ vs_cid, 2, src_port, dst_port, len, 1, op, 0, 65536, vs_fwd_cnt };
    for (uint32_t i = 0; i < len; i++) vs_tx_buffer[sizeof *h + i] = (uint8_t)data[i];
    uint16_t seen = vs_tx.used.idx;
    vs_tx.desc[0] = (struct vq_desc){ (uint64_t)vs_tx_buffer, (uint32_t)sizeof *h + len, 0, 0 };
    ring_offer(&vs_tx, (uint16_t)0);
    mmio_write32(vs_base + 0x50, 1);
    while (*(volatile uint16_t *)&vs_tx.used.idx == seen) {}
}

static void user_vsock(uint64_t unused) {
    (void)unused;
    int echoed = 0, acknowledged = 0;
    uint16_t seen = 0, events_seen = 0;
    if (!vs_stay) vsock_send(1, 49152, 5000, 0, 0);            /* REQUEST to host port 5000 */
    while (vs_stay || !(echoed && acknowledged)) {
        if (*(volatile uint16_t *)&vs_ev.used.idx != events_seen) {
            events_seen++;
            uint32_t event = *(volatile uint32_t *)vs_ev_buffer;
            puts_raw("vsock: event "); put_dec(event); puts_raw(event == 0 ? " (transport reset)\n" : "\n");
            ring_offer(&vs_ev, (uint16_t)0);
            mmio_write32(vs_base + 0x50, 2);
        }
        if (*(volatile uint16_t *)&vs_rx.used.idx == seen) continue;
        uint32_t id = vs_rx.used.ring[seen % NQ].id;
        seen++;
        struct vsock_hdr *h = (struct vsock_hdr *)vs_rx_buffers[id % NQ];
        char *data = (char *)vs_rx_buffers[id % NQ] + sizeof *h;
        uint32_t len = h->len < 1000 ? h->len : 1000;
        if (h->op == 5) vs_fwd_cnt += h->len;
        if (h->op == 1 && h->dst_port == 1234) {
            vsock_send(2, 1234, h->src_port, 0, 0);
            puts_raw("vsock: accepted host port "); put_dec(h->src_port); puts_raw("\n");
        } else if (h->op == 5 && h->dst_port == 1234) {
            static char reply[1100];
            const char *prefix = "echo:";
            uint32_t n = 0;
            for (; prefix[n]; n++) reply[n] = prefix[n];
            for (uint32_t i = 0; i < len; i++) reply[n + i] = data[i];
            vsock_send(5, 1234, h->src_port, reply, n + len);
            data[len] = 0;
            puts_raw("vsock: host sent "); puts_raw(data); puts_raw("\n");
            echoed = 1;
        } else if (h->op == 2 && h->dst_port == 49152) {
            puts_raw("vsock: connected to host port 5000\n");
            const char *hello = "hello from the guest\n";
            vsock_send(5, 49152, 5000, hello, (uint32_t)str_len(hello));
        } else if (h->op == 5 && h->dst_port == 49152) {
            data[len] = 0;
            puts_raw("vsock: host port 5000 replied "); puts_raw(data); puts_raw("\n");
            acknowledged = 1;
        } else if (h->op == 4) {
            vsock_send(3, h->dst_port, h->src_port, 0, 0);
            puts_raw("vsock: shutdown on port "); put_dec(h->dst_port); puts_raw("\n");
        } else if (h->op == 3) {
            puts_raw("vsock: reset on port "); put_dec(h->dst_port); puts_raw("\n");
            if (h->dst_port == 49152) { puts_raw("vsock: host port 5000 refused\n"); finish(); }
        }
        ring_offer(&vs_rx, (uint16_t)id);
        mmio_write32(vs_base + 0x50, 0);
    }
    puts_raw("vsock: both directions done\n");
    finish();
}

static void probe_vsock(void) {
    char n[8];
    vs_stay = cmdline_value("stay", n, sizeof n) && n[0] == '1';
    for_each_virtio_device(probe_vsock_device);
    if (!vs_base) { puts_raw("vsock: no virtio-vsock device\n"); return; }
    enter_user_mode(user_vsock, 0);
}

/* ---- probe=balloon: a minimal virtio-balloon driver. Dirties a 16 MiB region, then from ring 3
 * follows the host's target: inflates with that region's page frames (up to all 4096), deflates
 * (and touches the pages again) when the target drops, reports statistics, and finishes once the
 * target is back to 0 after an inflation. ---- */
static struct vring8 bl_q[3];
static uint8_t bl_region[16 << 20] __attribute__((aligned(4096)));
static uint32_t bl_pfns[256];
static struct { uint16_t tag; uint64_t value; } __attribute__((packed)) bl_stats[2];
static uintptr_t bl_base;
static int bl_has_stats;

static void bl_submit(int q, void *buffer, uint32_t len) {
    uint16_t seen = bl_q[q].used.idx;
    bl_q[q].desc[0] = (struct vq_desc){ (uint64_t)buffer, len, 0, 0 };
    ring_offer(&bl_q[q], (uint16_t)0);
    mmio_write32(bl_base + 0x50, (uint32_t)q);
    if (q < 2) while (*(volatile uint16_t *)&bl_q[q].used.idx == seen) {}
}

static void probe_balloon_device(int index, uintptr_t base) {
    (void)index;
    if (bl_base || mmio_read32(base) != 0x74726976 || mmio_read32(base + 8) != 5) return;
    mmio_write32(base + 0x70, 0);
    mmio_write32(base + 0x70, 1 | 2);
    mmio_write32(base + 0x14, 0); uint32_t f0 = mmio_read32(base + 0x10);
    mmio_write32(base + 0x14, 1); uint32_t f1 = mmio_read32(base + 0x10);
    mmio_write32(base + 0x24, 0); mmio_write32(base + 0x20, f0 & 6);
    mmio_write32(base + 0x24, 1); mmio_write32(base + 0x20, f1 & 1);
    mmio_write32(base + 0x70, 1 | 2 | 8);
    if (!(mmio_read32(base + 0x70) & 8)) { puts_raw("balloon: features refused\n"); return; }
    bl_has_stats = (f0 >> 1) & 1;
    for (int q = 0; q < 2 + bl_has_stats; q++) ring_setup(base, (uint32_t)q, &bl_q[q], q == 2 ? 1 : NQ);
    mmio_write32(base + 0x70, 1 | 2 | 8 | 4);
    bl_base = base;
    for (uint64_t page = 0; page < sizeof bl_region; page += 4096) bl_region[page] = 1;
    if (bl_has_stats) {
        bl_stats[0].tag = 4; bl_stats[0].value = 111 << 20;     /* free memory */
        bl_stats[1].tag = 5; bl_stats[1].value = 128 << 20;     /* total memory */
        bl_submit(2, bl_stats, sizeof bl_stats);
    }
    puts_raw("balloon: ready stats="); put_dec((uint64_t)bl_has_stats); puts_raw(" deflate_on_oom="); put_dec((f0 >> 2) & 1); puts_raw("\n");
}

static void user_balloon(uint64_t unused) {
    (void)unused;
    uint32_t actual = 0, inflated_once = 0;
    uint16_t stats_seen = 0;
    const uint32_t capacity = sizeof bl_region / 4096;
    uint64_t region_pfn = (uint64_t)(uintptr_t)bl_region >> 12;
    for (;;) {
        uint32_t target = mmio_read32(bl_base + 0x100);
        if (target > capacity) target = capacity;
        if (target > actual) {
            uint32_t n = target - actual > 256 ? 256 : target - actual;
            for (uint32_t i = 0; i < n; i++) bl_pfns[i] = (uint32_t)(region_pfn + actual + i);
            bl_submit(0, bl_pfns, n * 4);
            actual += n;
            mmio_write32(bl_base + 0x104, actual);
            if (actual == target) { puts_raw("balloon: inflated "); put_dec(actual); puts_raw(" pages\n"); inflated_once = 1; }
        } else if (target < actual) {
            uint32_t n = actual - target > 256 ? 256 : actual - target;
            for (uint32_t i = 0; i < n; i++) bl_pfns[i] = (uint32_t)(region_pfn + actual - n + i);
            bl_submit(1, bl_pfns, n * 4);
            actual -= n;
            for (uint32_t i = 0; i < n; i++) bl_region[(uint64_t)(actual + i) * 4096] = 2;   /* the guest uses them again */
            mmio_write32(bl_base + 0x104, actual);
            if (actual == target) { puts_raw("balloon: deflated to "); put_dec(actual); puts_raw(" pages\n"); }
        } else if (inflated_once && target == 0) {
            puts_raw("balloon: done\n");
            finish();
        }
        if (bl_has_stats && *(volatile uint16_t *)&bl_q[2].used.idx != stats_seen) {
            stats_seen = bl_q[2].used.idx;
            bl_stats[0].value = (uint64_t)(capacity - actual) * 4096;
            bl_submit(2, bl_stats, sizeof bl_stats);
            if (stats_seen == 1) puts_raw("balloon: statistics refreshed\n");
        }
    }
}

static void probe_balloon(void) {
    for_each_virtio_device(probe_balloon_device);
    if (!bl_base) { puts_raw("balloon: no virtio-balloon device\n"); return; }
    enter_user_mode(user_balloon, 0);
}

/* ---- probe=ticker: prints "tick N" forever from ring 3 (native speed here), so a test can see
 * whether the guest makes progress (pause/resume); polls the i8042 and resets the machine when
 * Ctrl-Alt-Del arrives, as a guest that honours a graceful shutdown request would ---- */
static int ticker_ignores_button;
static void user_ticker(uint64_t spin) {
    int ctrl = 0, alt = 0, extended = 0, release = 0;
    for (uint64_t tick = 0;; tick++) {
        for (volatile uint64_t i = 0; i < spin; i++) {}
        puts_raw("tick "); put_dec(tick); puts_raw("\n");
        if (acpi.found && (inb(acpi.ged_port) & 1)) {
            if (ticker_ignores_button) puts_raw("ticker: power button, ignored\n");
            else { puts_raw("ticker: power button, entering S5\n"); acpi_power_off(); }
        }
        while (inb(0x64) & 1) {
            uint8_t code = inb(0x60);
            /* Set 1 (translated) and set 2 codes for Ctrl, Alt and Delete. */
            if (code == 0xe0) { extended = 1; continue; }
            if (code == 0xf0) { release = 1; continue; }
            int up = release || (code & 0x80);
            uint8_t key = code & 0x7f;
            if (!extended && (key == 0x1d || code == 0x14)) ctrl = !up;
            else if (!extended && (key == 0x38 || code == 0x11)) alt = !up;
            else if (extended && (key == 0x53 || code == 0x71) && !up && ctrl && alt) {
                puts_raw("ticker: ctrl-alt-del, resetting\n");
                outb(0x64, 0xfe);
            }
            extended = 0; release = 0;
        }
    }
}

/* ---- probe=dirty [fill=1]: from ring 3 (native speed here) rewrites 1/stride of an 8 MiB region each
 * round with a pseudo-random sequence, keeping the sum it expects the region to have; then reads
 * the whole region back and prints "dirty N sum S", or "dirty N MISMATCH S" when what memory holds
 * is not what it wrote. Saved and restored (or migrated), N goes on from where it was, and the
 * sums keep matching only if every page came back as it was. ---- */
static uint64_t dirty_region[(8 << 20) / 8] __attribute__((aligned(4096)));
static uint64_t dirty_spin = 2000000, dirty_stride = 64;
static void user_dirty(uint64_t unused) {
    (void)unused;
    const uint64_t words = sizeof dirty_region / 8;
    uint64_t expected = 0, seed = 0x9e3779b97f4a7c15ULL;
    for (uint64_t round = 0;; round++) {
        for (uint64_t i = round % dirty_stride; i < words; i += dirty_stride) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            expected -= dirty_region[i];
            dirty_region[i] = seed;
            expected += seed;
        }
        uint64_t sum = 0;
        for (uint64_t i = 0; i < words; i++) sum += ((volatile uint64_t *)dirty_region)[i];
        puts_raw("dirty "); put_dec(round); puts_raw(sum == expected ? " sum " : " MISMATCH "); put_hex(sum); puts_raw("\n");
        for (volatile uint64_t i = 0; i < dirty_spin; i++) {}
    }
}

/* Writes one word in every 4 KiB page of RAM from the end of the probe's image (linker symbol) to
 * the top of the highest e820 RAM range, and of the image's own idle buffers: a guest that really
 * uses all its memory. */
extern char image_end[];
static uint64_t fill_ram(int with_dirty_region);
static void probe_fill(void) {
    uint64_t pages = fill_ram(1);
    puts_raw("fill: done pages="); put_dec(pages); puts_raw("\n");
}
/* The pages written, all but the dirtying probe's region when it is about to use it. */
static uint64_t fill_ram(int with_dirty_region) {
    uint64_t top = 0;
    for (int i = 0; i < memmap_count; i++) {
        if (memmap[i].type == 1 && memmap[i].addr + memmap[i].size > top) top = memmap[i].addr + memmap[i].size;
    }
    if (top > (4ULL << 30)) top = 4ULL << 30;   /* the identity map's end */
    puts_raw("fill: top="); put_hex(top); puts_raw("\n");
    uint64_t pages = 0;
    /* The image's own big buffers, unused in this mode, are RAM the guest uses too. */
    for (uint64_t offset = 0; offset < sizeof bl_region; offset += 4096, pages++) bl_region[offset] = 1;
    if (with_dirty_region) {
        for (uint64_t word = 0; word < sizeof dirty_region / 8; word += 512, pages++) dirty_region[word] = 1;
    }
    for (uint64_t offset = 0; offset < sizeof bench_buffer; offset += 4096, pages++) bench_buffer[offset] = 1;
    /* Between the first MiB (boot data, ACPI tables) and the image at 2 MiB nothing lives. */
    for (uint64_t address = 1ULL << 20; address < 2ULL << 20; address += 4096, pages++) *(volatile uint64_t *)address = address | 1;
    for (uint64_t address = ((uint64_t)image_end + 4095) & ~4095ULL; address + 4096 <= top; address += 4096, pages++) {
        *(volatile uint64_t *)address = address | 1;
    }
    return pages;
}

uintptr_t probe_zero_page;

void probe_main(int mode, uintptr_t info) {
    *BOOT_MARKER = 123;
    puts_raw("probe: mode="); puts_raw(mode == MODE_PVH ? "pvh" : "linux64"); puts_raw("\n");
    probe_zero_page = info;
    read_boot_info(mode, info);
    char what[32];
    if (!cmdline_value("probe", what, sizeof what)) { puts_raw("probe: no probe= on the command line\n"); finish(); }
    if (str_eq(what, "info")) probe_info();
    else if (str_eq(what, "smp")) probe_smp();
    else if (str_eq(what, "irq")) probe_irq();
    else if (str_eq(what, "triple")) probe_triple();
    else if (str_eq(what, "acpi")) probe_acpi();
    else if (str_eq(what, "reboot")) probe_reboot();
    else if (str_eq(what, "blk")) probe_blk();
    else if (str_eq(what, "blkloop")) probe_blkloop();
    else if (str_eq(what, "rng")) probe_rng();
    else if (str_eq(what, "net")) probe_net();
    else if (str_eq(what, "ip")) probe_ip();
    else if (str_eq(what, "vsock")) probe_vsock();
    else if (str_eq(what, "balloon")) probe_balloon();
    else if (str_eq(what, "blkbench")) probe_blkbench();
    else if (str_eq(what, "fill")) probe_fill();
    else if (str_eq(what, "ports")) {
        char n[24];
        uint64_t count = cmdline_value("count", n, sizeof n) ? parse_dec(n) : 100000;
        enter_user_mode(user_port_loop, count);
    } else if (str_eq(what, "ticker")) {
        char n[24];
        uint64_t spin = cmdline_value("spin", n, sizeof n) ? parse_dec(n) : 20000000;
        ticker_ignores_button = cmdline_value("ignore-button", n, sizeof n) && n[0] == '1';
        parse_acpi();
        enter_user_mode(user_ticker, spin);
    } else if (str_eq(what, "dirty")) {
        char n[24];
        if (cmdline_value("spin", n, sizeof n)) dirty_spin = parse_dec(n);
        if (cmdline_value("stride", n, sizeof n) && parse_dec(n) > 0) dirty_stride = parse_dec(n);
        /* fill=1: every other page of RAM holds data first (and is never touched again). */
        if (cmdline_value("fill", n, sizeof n) && n[0] == '1') {
            uint64_t pages = fill_ram(0);
            puts_raw("fill: done pages="); put_dec(pages); puts_raw("\n");
        }
        enter_user_mode(user_dirty, 0);
    } else if (str_eq(what, "hello")) puts_raw("hello from the probe\n");
    else { puts_raw("probe: unknown probe "); puts_raw(what); puts_raw("\n"); }
    finish();
}
