// The VMM's confinement: seccomp filters (libseccomp), Landlock, the mount jail and the
// namespaced spawn. Kept in C because each step is a sequence of raw system calls whose order
// matters and which must run before the process has any other thread.
#define _GNU_SOURCE
#include "csandbox.h"
#include <errno.h>
#include <linux/fs.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

// MARK: seccomp

static scmp_filter_ctx build_filter(const char *const *names, int count, unsigned rules, int log_only,
                                    char *error, int error_size, int *result_out);

enum { SLOTS = 8 };
static struct sock_fprog prepared[SLOTS];

int vireo_seccomp_prepare(int kind, const char *const *names, int count, unsigned rules, int log_only,
                          char *error, int error_size) {
    if (kind < 0 || kind >= SLOTS) { snprintf(error, error_size, "no filter slot %d", kind); return EINVAL; }
    int result = 0;
    scmp_filter_ctx filter = build_filter(names, count, rules, log_only, error, error_size, &result);
    if (!filter) return result;
    // libseccomp exports the program to a descriptor; a memfd holds it for reading back.
    int fd = memfd_create("vireo-seccomp", MFD_CLOEXEC);
    if (fd < 0) { result = errno; snprintf(error, error_size, "memfd_create"); goto out; }
    int exported = seccomp_export_bpf(filter, fd);
    if (exported < 0) { result = -exported; snprintf(error, error_size, "seccomp_export_bpf: %s", strerror(-exported)); goto out; }
    off_t size = lseek(fd, 0, SEEK_END);
    if (size <= 0 || size % sizeof(struct sock_filter) != 0 || size / sizeof(struct sock_filter) > 65535) {
        result = EINVAL; snprintf(error, error_size, "exported filter of %lld bytes", (long long)size); goto out;
    }
    struct sock_filter *program = malloc(size);
    if (!program || pread(fd, program, size, 0) != size) {
        free(program); result = EIO; snprintf(error, error_size, "reading the exported filter"); goto out;
    }
    free(prepared[kind].filter);
    prepared[kind].filter = program;
    prepared[kind].len = (unsigned short)(size / sizeof(struct sock_filter));
out:
    if (fd >= 0) close(fd);
    seccomp_release(filter);
    return result;
}

int vireo_seccomp_apply(int kind) {
    if (kind < 0 || kind >= SLOTS || !prepared[kind].filter) return EINVAL;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prepared[kind]) == 0 ? 0 : errno;
}

static scmp_filter_ctx build_filter(const char *const *names, int count, unsigned rules, int log_only,
                                    char *error, int error_size, int *result_out) {
    scmp_filter_ctx filter = seccomp_init(log_only ? SCMP_ACT_LOG : SCMP_ACT_TRAP);
    if (!filter) { snprintf(error, error_size, "seccomp_init failed"); *result_out = ENOMEM; return NULL; }
    int result = 0;
    for (int i = 0; i < count; i++) {
        int number = seccomp_syscall_resolve_name(names[i]);
        if (number == __NR_SCMP_ERROR) {
            snprintf(error, error_size, "unknown system call '%s'", names[i]);
            result = EINVAL;
            goto out;
        }
        int added = seccomp_rule_add(filter, SCMP_ACT_ALLOW, number, 0);
        if (added < 0) { snprintf(error, error_size, "allowing %s: %s", names[i], strerror(-added)); result = -added; goto out; }
    }
#define RULE(call, ...) do { int added = (call); \
        if (added < 0) { snprintf(error, error_size, __VA_ARGS__); result = -added; goto out; } } while (0)
    if (rules & (VIREO_SECCOMP_IOCTL_KVM | VIREO_SECCOMP_IOCTL_TTY_TUN)) {
        if (rules & VIREO_SECCOMP_IOCTL_KVM)
            RULE(seccomp_rule_add(filter, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A1(SCMP_CMP_MASKED_EQ, 0xff00, 0xae00)), "ioctl rule (KVM)");
        if (rules & VIREO_SECCOMP_IOCTL_TTY_TUN)
            RULE(seccomp_rule_add(filter, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A1(SCMP_CMP_MASKED_EQ, 0xff00, 0x5400)), "ioctl rule (tty, tun)");
    }
    if (rules & VIREO_SECCOMP_IOCTL_DISCARD)
        RULE(seccomp_rule_add(filter, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A1(SCMP_CMP_EQ, BLKDISCARD)), "ioctl rule (BLKDISCARD)");
    if (rules & VIREO_SECCOMP_SOCKET_UNIX) {
        RULE(seccomp_rule_add(filter, SCMP_ACT_ALLOW, SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, AF_UNIX)), "socket rule");
        RULE(seccomp_rule_add(filter, SCMP_ACT_ALLOW, SCMP_SYS(socketpair), 1, SCMP_A0(SCMP_CMP_EQ, AF_UNIX)), "socketpair rule");
        // glibc's getaddrinfo (libiscsi's, on a numeric portal, when an iSCSI path reconnects)
        // asks the routing netlink which address families are configured; refused, it assumes
        // both. A jailed VMM has no network of its own to learn about.
        RULE(seccomp_rule_add(filter, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, AF_NETLINK)), "netlink socket refusal");
    }
    if (rules & VIREO_SECCOMP_CLONE_THREAD) {
        // clone3 takes its flags in memory, out of a filter's reach: glibc falls back to clone.
        RULE(seccomp_rule_add(filter, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0), "clone3 rule");
        RULE(seccomp_rule_add(filter, SCMP_ACT_ALLOW, SCMP_SYS(clone), 1,
                              SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD)), "clone rule");
    }
    if (rules & VIREO_SECCOMP_SIGNAL_SELF) {
        RULE(seccomp_rule_add(filter, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1, SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid())), "tgkill rule");
    }
    if (rules & VIREO_SECCOMP_OPEN_REFUSED) {
        RULE(seccomp_rule_add(filter, SCMP_ACT_ERRNO(EACCES), SCMP_SYS(openat), 0), "openat refusal");
        RULE(seccomp_rule_add(filter, SCMP_ACT_ERRNO(EACCES), SCMP_SYS(open), 0), "open refusal");
    }
#undef RULE
    // Every exit of a vCPU passes both its own filter and the process-wide one: KVM_RUN's ioctl
    // is tested first, and the rest as a binary tree rather than a list.
    seccomp_syscall_priority(filter, SCMP_SYS(ioctl), 255);
    seccomp_attr_set(filter, SCMP_FLTATR_CTL_OPTIMIZE, 2);
    return filter;
out:
    seccomp_release(filter);
    *result_out = result;
    return NULL;
}

static int violation_log = 2;

static size_t append_text(char *buffer, size_t at, size_t size, const char *text) {
    while (*text && at + 1 < size) buffer[at++] = *text++;
    return at;
}

static size_t append_number(char *buffer, size_t at, size_t size, long value) {
    char digits[24];
    int count = 0;
    unsigned long magnitude = value < 0 ? -(unsigned long)value : (unsigned long)value;
    do { digits[count++] = '0' + magnitude % 10; magnitude /= 10; } while (magnitude && count < 23);
    if (value < 0 && at + 1 < size) buffer[at++] = '-';
    while (count && at + 1 < size) buffer[at++] = digits[--count];
    return at;
}

// Async-signal-safe: only write, prctl and exit_group, which every filter allows.
static void on_violation(int signal, siginfo_t *info, void *context) {
    (void)signal; (void)context;
    char name[17] = {0};
    prctl(PR_GET_NAME, name, 0, 0, 0);
    char line[160];
    size_t at = 0;
    at = append_text(line, at, sizeof line, "vireo: seccomp: forbidden system call ");
    at = append_number(line, at, sizeof line, info->si_syscall);
    at = append_text(line, at, sizeof line, " from thread ");
    at = append_text(line, at, sizeof line, name);
    at = append_text(line, at, sizeof line, "\n");
    ssize_t ignored = write(violation_log, line, at);
    (void)ignored;
    syscall(SYS_exit_group, 128 + SIGSYS);
}

int vireo_seccomp_catch_violations(int log_fd) {
    violation_log = log_fd;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_violation;
    action.sa_flags = SA_SIGINFO;
    sigfillset(&action.sa_mask);
    if (sigaction(SIGSYS, &action, NULL) != 0) return errno;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGSYS);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return 0;
}

char *vireo_seccomp_syscall_name(int number) {
    return seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, number);
}

// MARK: Landlock

#ifndef LANDLOCK_ACCESS_FS_REFER
#define LANDLOCK_ACCESS_FS_REFER (1ULL << 13)
#endif
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif

int vireo_landlock_abi(void) {
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    return abi < 0 ? 0 : (int)abi;
}

int vireo_landlock_restrict(const char *const *paths, const int *writable, int count, int *failed) {
    return vireo_landlock_restrict_exec(paths, writable, NULL, count, failed);
}

int vireo_landlock_restrict_exec(const char *const *paths, const int *writable, const int *executable, int count, int *failed) {
    int abi = vireo_landlock_abi();
    if (abi <= 0) return errno ? errno : EOPNOTSUPP;
    const __u64 file_read = LANDLOCK_ACCESS_FS_READ_FILE;
    __u64 file_write = LANDLOCK_ACCESS_FS_WRITE_FILE | (abi >= 3 ? LANDLOCK_ACCESS_FS_TRUNCATE : 0);
    const __u64 dir_read = LANDLOCK_ACCESS_FS_READ_DIR;
    __u64 dir_write = LANDLOCK_ACCESS_FS_REMOVE_DIR | LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_DIR
        | LANDLOCK_ACCESS_FS_MAKE_REG | LANDLOCK_ACCESS_FS_MAKE_SOCK | (abi >= 2 ? LANDLOCK_ACCESS_FS_REFER : 0);
    // Everything this ABI can refuse is handled, so whatever no rule grants is refused.
    struct landlock_ruleset_attr attributes = {
        .handled_access_fs = file_read | file_write | dir_read | dir_write | LANDLOCK_ACCESS_FS_EXECUTE
            | LANDLOCK_ACCESS_FS_MAKE_CHAR | LANDLOCK_ACCESS_FS_MAKE_FIFO | LANDLOCK_ACCESS_FS_MAKE_BLOCK
            | LANDLOCK_ACCESS_FS_MAKE_SYM,
    };
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attributes, sizeof attributes, 0);
    if (ruleset < 0) return errno;
    int result = 0;
    for (int i = 0; i < count; i++) {
        int fd = open(paths[i], O_PATH | O_CLOEXEC);
        struct stat status;
        if (fd < 0 || fstat(fd, &status) != 0) { result = errno; *failed = i; if (fd >= 0) close(fd); goto out; }
        struct landlock_path_beneath_attr rule = { .parent_fd = fd };
        __u64 execute = executable && executable[i] ? LANDLOCK_ACCESS_FS_EXECUTE : 0;
        if (S_ISDIR(status.st_mode)) {
            rule.allowed_access = file_read | dir_read | execute | (writable[i] ? file_write | dir_write : 0);
        } else {
            rule.allowed_access = file_read | execute | (writable[i] ? file_write : 0);
        }
        long added = syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0);
        int saved = errno;
        close(fd);
        if (added != 0) { result = saved; *failed = i; goto out; }
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) { result = errno; *failed = -1; goto out; }
    if (syscall(SYS_landlock_restrict_self, ruleset, 0) != 0) { result = errno; *failed = -1; }
out:
    close(ruleset);
    return result;
}

// MARK: the jail

static int make_parents(char *path) {
    for (char *slash = strchr(path + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = 0;
        int made = mkdir(path, 0755);
        *slash = '/';
        if (made != 0 && errno != EEXIST) return errno;
    }
    return 0;
}

int vireo_jail_pivot(const char *root, const char *const *paths, const int *writable, int count,
                     char *error, int error_size) {
#define FAIL(...) do { int saved = errno; snprintf(error, error_size, __VA_ARGS__); umask(mask); return saved ? saved : EINVAL; } while (0)
    // The jail's own directories (mount points in its tmpfs) are traversable by its uid, whatever
    // umask the process keeps for the files it makes.
    mode_t mask = umask(022);
    // Nothing mounted here may propagate back to the host's namespace.
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) FAIL("making / private");
    char target[4096];
    if (snprintf(target, sizeof target, "%s/", root) >= (int)sizeof target) { errno = ENAMETOOLONG; FAIL("%s", root); }
    int parents = make_parents(target);
    if (parents) { errno = parents; FAIL("making %s", root); }
    // Not nodev: /dev/kvm and /dev/net/tun are bound into it.
    if (mount("tmpfs", root, "tmpfs", MS_NOSUID, "mode=0755,size=1m") != 0) FAIL("mounting a tmpfs on %s", root);
    for (int i = 0; i < count; i++) {
        struct stat status;
        if (stat(paths[i], &status) != 0) FAIL("stat %s", paths[i]);
        if (snprintf(target, sizeof target, "%s%s", root, paths[i]) >= (int)sizeof target) { errno = ENAMETOOLONG; FAIL("%s", paths[i]); }
        int made = make_parents(target);
        if (made) { errno = made; FAIL("making the parents of %s", target); }
        if (S_ISDIR(status.st_mode)) {
            if (mkdir(target, 0755) != 0 && errno != EEXIST) FAIL("mkdir %s", target);
        } else {
            int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
            if (fd < 0) FAIL("creating the mount point %s", target);
            close(fd);
        }
        if (mount(paths[i], target, NULL, MS_BIND, NULL) != 0) FAIL("binding %s", paths[i]);
        unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (writable[i] ? 0 : MS_RDONLY)
            | (S_ISCHR(status.st_mode) || S_ISBLK(status.st_mode) ? 0 : MS_NODEV);
        if (mount(NULL, target, NULL, flags, NULL) != 0) FAIL("remounting %s", target);
    }
    // A /proc of the VMM's own PID namespace: itself only (the pagemap and statm it reads).
    if (snprintf(target, sizeof target, "%s/proc", root) >= (int)sizeof target) { errno = ENAMETOOLONG; FAIL("proc"); }
    if (mkdir(target, 0555) != 0 && errno != EEXIST) FAIL("mkdir %s", target);
    if (mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) FAIL("mounting proc");
    if (chdir(root) != 0) FAIL("chdir %s", root);
    if (syscall(SYS_pivot_root, ".", ".") != 0) FAIL("pivot_root");
    if (umount2(".", MNT_DETACH) != 0) FAIL("detaching the host's root");
    if (chdir("/") != 0) FAIL("chdir /");
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, NULL) != 0) FAIL("making the jail's root read-only");
    umask(mask);
    return 0;
#undef FAIL
}

int vireo_jail_unshare(void) {
    return unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET) == 0 ? 0 : errno;
}

int vireo_jail_limit_resources(unsigned long files) {
    struct rlimit none = { 0, 0 }, descriptors = { files, files };
    if (setrlimit(RLIMIT_CORE, &none) != 0) return errno;
    struct rlimit current;
    // Only ever lowered: raising a hard limit needs CAP_SYS_RESOURCE, which root may lack.
    if (getrlimit(RLIMIT_NOFILE, &current) == 0 && current.rlim_max < files) descriptors.rlim_cur = descriptors.rlim_max = current.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &descriptors) != 0) return errno;
    return 0;
}

int vireo_jail_drop_privileges(uid_t uid, gid_t gid, int keep_realtime) {
    if (keep_realtime && prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0) return errno;
    if (setgroups(0, NULL) != 0) return errno;
    if (setresgid(gid, gid, gid) != 0) return errno;
    if (setresuid(uid, uid, uid) != 0) return errno;
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (keep_realtime) {
        // Of everything KEEPCAPS kept, only these two stay (permitted and effective).
        struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
        struct __user_cap_data_struct data[2];
        memset(data, 0, sizeof data);
        const int kept[] = { CAP_SYS_NICE, CAP_IPC_LOCK };
        for (unsigned i = 0; i < sizeof kept / sizeof kept[0]; i++) {
            data[kept[i] / 32].permitted |= 1u << (kept[i] % 32);
            data[kept[i] / 32].effective |= 1u << (kept[i] % 32);
        }
        if (syscall(SYS_capset, &header, data) != 0) return errno;
        prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
    return 0;
}

// MARK: the namespaced spawn

struct spawn_arguments {
    const char *path;
    char *const *argv;
    int log_fd, lock_fd, ready_fd;
    const int *inherit;
    int inherit_count;
    char *const *cgroup_procs;
    int cgroup_count;
    int exec_error;
    const struct vireo_jail_spec *jail;
    char *error;
    int error_size;
};

/// The jail of vireo_spawn_jailed, in the child (which shares its parent's memory until it execs:
/// no malloc here, and no glibc set*id wrappers, which would signal the parent's threads).
static int confine_child(struct spawn_arguments *arguments) {
    const struct vireo_jail_spec *jail = arguments->jail;
    int result = vireo_jail_pivot(jail->root, jail->paths, jail->writable, jail->count, arguments->error, arguments->error_size);
    if (result) return result;
    sethostname("vireo-qemu", 10);
    result = vireo_jail_limit_resources(4096);
    if (result) { snprintf(arguments->error, arguments->error_size, "setrlimit"); return result; }
    gid_t groups[1] = { jail->group };
    if (syscall(SYS_setgroups, jail->group ? 1 : 0, groups) != 0) { snprintf(arguments->error, arguments->error_size, "setgroups"); return errno; }
    if (syscall(SYS_setresgid, jail->gid, jail->gid, jail->gid) != 0) { snprintf(arguments->error, arguments->error_size, "setresgid %u", jail->gid); return errno; }
    if (syscall(SYS_setresuid, jail->uid, jail->uid, jail->uid) != 0) { snprintf(arguments->error, arguments->error_size, "setresuid %u", jail->uid); return errno; }
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) { snprintf(arguments->error, arguments->error_size, "no_new_privs"); return errno; }
    if (jail->landlock && vireo_landlock_abi() > 0) {
        int failed = -1;
        result = vireo_landlock_restrict_exec(jail->paths, jail->writable, jail->executable, jail->count, &failed);
        if (result) {
            snprintf(arguments->error, arguments->error_size, "Landlock rule for %s", failed >= 0 && failed < jail->count ? jail->paths[failed] : "restrict_self");
            return result;
        }
    }
    return 0;
}

static int spawned_child(void *opaque) {
    struct spawn_arguments *arguments = opaque;
    // Into the VM's groups first ("0": the writing task), before exec allocates anything.
    for (int i = 0; i < arguments->cgroup_count; i++) {
        int fd = open(arguments->cgroup_procs[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) {
            arguments->exec_error = errno ? errno : EIO;
            _exit(127);
        }
        close(fd);
    }
    setsid();
    if (arguments->jail) {
        int confined = confine_child(arguments);
        if (confined) {
            arguments->exec_error = confined;
            _exit(127);
        }
    }
    int null = open("/dev/null", O_RDONLY);
    if (null >= 0 && null != 0) { dup2(null, 0); close(null); }
    dup2(arguments->log_fd, 1);
    dup2(arguments->log_fd, 2);
    if (arguments->lock_fd >= 0) dup2(arguments->lock_fd, 3);
    if (arguments->ready_fd >= 0) dup2(arguments->ready_fd, 4);
    for (int i = 0; i < arguments->inherit_count; i++) dup2(arguments->inherit[i], 5 + i);
    syscall(SYS_close_range, 5 + arguments->inherit_count, ~0U, 0);
    struct sigaction defaults;
    memset(&defaults, 0, sizeof defaults);
    defaults.sa_handler = SIG_DFL;
    for (int signal = 1; signal < NSIG; signal++) sigaction(signal, &defaults, NULL);
    sigset_t empty;
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &empty, NULL);
    execve(arguments->path, arguments->argv, environ);
    arguments->exec_error = errno;
    _exit(127);
}

static int spawn_namespaced(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd,
                            const int *inherit, int inherit_count, char *const *cgroup_procs, int cgroup_count,
                            const struct vireo_jail_spec *jail, char *error, int error_size, pid_t *pid);

int vireo_spawn_namespaced(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd,
                           const int *inherit, int inherit_count, char *const *cgroup_procs, int cgroup_count,
                           pid_t *pid) {
    return spawn_namespaced(path, argv, log_fd, lock_fd, ready_fd, inherit, inherit_count, cgroup_procs, cgroup_count,
                            NULL, NULL, 0, pid);
}

int vireo_spawn_jailed(const char *path, char *const argv[], int log_fd, int lock_fd,
                       const int *inherit, int inherit_count, char *const *cgroup_procs, int cgroup_count,
                       const struct vireo_jail_spec *jail, char *error, int error_size, pid_t *pid) {
    if (error_size > 0) error[0] = 0;
    return spawn_namespaced(path, argv, log_fd, lock_fd, -1, inherit, inherit_count, cgroup_procs, cgroup_count,
                            jail, error, error_size, pid);
}

static int spawn_namespaced(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd,
                            const int *inherit, int inherit_count, char *const *cgroup_procs, int cgroup_count,
                            const struct vireo_jail_spec *jail, char *error, int error_size, pid_t *pid) {
    enum { MAX_INHERIT = 64, STACK = 256 * 1024 };
    if (inherit_count < 0 || inherit_count > MAX_INHERIT) return EINVAL;
    // As in vireo_spawn_detached_inheriting: every source above every target first.
    int floor = 10 + inherit_count;
    int high[MAX_INHERIT];
    int made = 0, result = 0;
    int log_high = fcntl(log_fd, F_DUPFD_CLOEXEC, floor);
    int lock_high = lock_fd < 0 ? -1 : fcntl(lock_fd, F_DUPFD_CLOEXEC, floor);
    int ready_high = ready_fd < 0 ? -1 : fcntl(ready_fd, F_DUPFD_CLOEXEC, floor);
    char *stack = NULL;
    if (log_high < 0 || (lock_fd >= 0 && lock_high < 0) || (ready_fd >= 0 && ready_high < 0)) { result = errno; goto out; }
    for (; made < inherit_count; made++) {
        high[made] = fcntl(inherit[made], F_DUPFD_CLOEXEC, floor);
        if (high[made] < 0) { result = errno; goto out; }
    }
    stack = malloc(STACK);
    if (!stack) { result = ENOMEM; goto out; }
    struct spawn_arguments arguments = { path, argv, log_high, lock_high, ready_high, high, inherit_count,
                                         cgroup_procs, cgroup_count, 0, jail, error, error_size };
    // The child shares this memory until it execs (CLONE_VM | CLONE_VFORK, as posix_spawn does);
    // no handler of ours may run on it meanwhile.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    // A jailed program gets its own network namespace too: everything it needs of the network
    // (taps, passt's socket) it inherits as descriptors.
    pid_t child = clone(spawned_child, stack + STACK,
                        CLONE_VM | CLONE_VFORK | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (jail ? CLONE_NEWNET : 0) | SIGCHLD,
                        &arguments);
    int clone_error = errno;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (child < 0) { result = clone_error; goto out; }
    if (arguments.exec_error) {
        waitpid(child, NULL, 0);
        result = arguments.exec_error;
        goto out;
    }
    *pid = child;
out:
    free(stack);
    for (int i = 0; i < made; i++) close(high[i]);
    if (log_high >= 0) close(log_high);
    if (lock_high >= 0) close(lock_high);
    if (ready_high >= 0) close(ready_high);
    return result;
}

// MARK: shared folders

#include <linux/close_range.h>
#include <sys/statvfs.h>

// What the forked child reports before it execs: 'U' when it is ready for its maps, or 'E', an
// errno and the failed step's name. A successful exec closes the pipe (close-on-exec).
// One write each (under PIPE_BUF, so atomic): the child's 'P' and the server's 'E' never
// interleave.
static void share_child_fail(int report, int code, const char *step) {
    char message[1 + sizeof code + 160];
    size_t length = strlen(step) < 160 ? strlen(step) : 160;
    message[0] = 'E';
    memcpy(message + 1, &code, sizeof code);
    memcpy(message + 1 + sizeof code, step, length);
    (void)!write(report, message, 1 + sizeof code + length);
    _exit(127);
}

static int write_map(pid_t child, const char *name, const char *map) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)child, name);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return errno;
    size_t length = strlen(map);
    ssize_t written = write(fd, map, length);
    int result = written == (ssize_t)length ? 0 : (written < 0 ? errno : EIO);
    close(fd);
    return result;
}

int vireo_spawn_share_server(const char *path, char *const argv[], int log_fd, const int *inherit, int inherit_count,
                             const struct vireo_share_server_spec *spec, char *error, int error_size, pid_t *pid) {
    enum { MAX_INHERIT = 16 };
    if (error_size > 0) error[0] = 0;
    if (inherit_count < 0 || inherit_count > MAX_INHERIT) return EINVAL;
    int floor = 10 + inherit_count;
    int high[MAX_INHERIT];
    int made = 0, result = 0;
    int to_child[2] = { -1, -1 }, from_child[2] = { -1, -1 };
    int log_high = fcntl(log_fd, F_DUPFD_CLOEXEC, floor);
    if (log_high < 0) return errno;
    for (; made < inherit_count; made++) {
        high[made] = fcntl(inherit[made], F_DUPFD_CLOEXEC, floor);
        if (high[made] < 0) { result = errno; goto out; }
    }
    if (pipe2(to_child, O_CLOEXEC) != 0 || pipe2(from_child, O_CLOEXEC) != 0) { result = errno; goto out; }
    // The mount flags a bind remount must keep (it may add, never silently drop, noexec and
    // the atime policy of the file system the directory is on).
    struct statvfs volume;
    unsigned long kept = 0;
    if (statvfs(spec->source, &volume) == 0) {
        if (volume.f_flag & ST_NOEXEC) kept |= MS_NOEXEC;
        if (volume.f_flag & ST_NOATIME) kept |= MS_NOATIME;
        if (volume.f_flag & ST_NODIRATIME) kept |= MS_NODIRATIME;
        if (volume.f_flag & ST_RELATIME) kept |= MS_RELATIME;
    }
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pid_t child = fork();
    if (child == 0) {
        // Only system calls from here to the exec: the parent has other threads.
        int report = from_child[1];
        struct sigaction standard;
        memset(&standard, 0, sizeof standard);
        standard.sa_handler = SIG_DFL;
        for (int signal_number = 1; signal_number < NSIG; signal_number++) sigaction(signal_number, &standard, NULL);
        setsid();
        if (unshare(CLONE_NEWNS) != 0) share_child_fail(report, errno, "unshare the mount namespace");
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) share_child_fail(report, errno, "make mounts private");
        if (mount(spec->source, spec->mount_point, NULL, MS_BIND, NULL) != 0) share_child_fail(report, errno, "bind the shared directory");
        struct stat bound;
        if (stat(spec->mount_point, &bound) != 0 || bound.st_dev != spec->source_dev || bound.st_ino != spec->source_ino) {
            share_child_fail(report, ESTALE, "check the shared directory (it was replaced since it was checked)");
        }
        unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | kept | (spec->read_only ? MS_RDONLY : 0);
        if (mount(NULL, spec->mount_point, NULL, flags, NULL) != 0) share_child_fail(report, errno, "remount the shared directory nosuid, nodev");
        if (unshare(CLONE_NEWUSER) != 0) share_child_fail(report, errno, "unshare the user namespace");
        char byte = 'U';
        if (write(report, &byte, 1) != 1 || read(to_child[0], &byte, 1) != 1) _exit(127);
        // The server itself is a grandchild: this child ends at once, so the server belongs to
        // init (or a subreaper) and never lingers as a zombie of a long-lived caller.
        pid_t server = fork();
        if (server < 0) share_child_fail(report, errno, "fork the server");
        if (server > 0) {
            char message[1 + sizeof server];
            message[0] = 'P';
            memcpy(message + 1, &server, sizeof server);
            (void)!write(report, message, sizeof message);
            _exit(0);
        }
        if (setresgid(0, 0, 0) != 0) share_child_fail(report, errno, "become the namespace's root group");
        if (setgroups(0, NULL) != 0) share_child_fail(report, errno, "drop supplementary groups");
        if (setresuid(0, 0, 0) != 0) share_child_fail(report, errno, "become the namespace's root");
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || dup2(null, 0) < 0 || dup2(log_high, 1) < 0 || dup2(log_high, 2) < 0) share_child_fail(report, errno, "set up stdio");
        for (int i = 0; i < inherit_count; i++) {
            if (dup2(high[i], 3 + i) < 0) share_child_fail(report, errno, "pass descriptors");
        }
        // Everything else closes at the exec (the report pipe too, which tells the parent).
        syscall(SYS_close_range, 3 + inherit_count, ~0U, CLOSE_RANGE_CLOEXEC);
        sigset_t empty;
        sigemptyset(&empty);
        sigprocmask(SIG_SETMASK, &empty, NULL);
        execve(path, argv, environ);
        share_child_fail(report, errno, "exec");
    }
    int fork_error = errno;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (child < 0) { result = fork_error; goto out; }
    close(to_child[0]); to_child[0] = -1;
    close(from_child[1]); from_child[1] = -1;
    const char *step = NULL;
    char tag = 0;
    int ready = 0;
    pid_t server = 0;
    ssize_t got = read(from_child[0], &tag, 1);
    if (got == 1 && tag == 'U') {
        ready = 1;
        if ((result = write_map(child, "uid_map", spec->uid_map)) != 0) step = "write the user namespace's uid_map";
        else if ((result = write_map(child, "gid_map", spec->gid_map)) != 0) step = "write the user namespace's gid_map";
        if (result == 0) {
            char go = 'g';
            (void)!write(to_child[1], &go, 1);
            got = read(from_child[0], &tag, 1);
            if (got == 1 && tag == 'P') {
                if (read(from_child[0], &server, sizeof server) != (ssize_t)sizeof server) server = 0;
                waitpid(child, NULL, 0);
                child = 0;
                got = read(from_child[0], &tag, 1);
            }
        }
    }
    if (result == 0 && got == 1 && tag == 'E') {
        int code = 0;
        char text[200] = { 0 };
        if (read(from_child[0], &code, sizeof code) == (ssize_t)sizeof code) {
            ssize_t length = read(from_child[0], text, sizeof text - 1);
            if (length > 0) text[length] = 0;
        }
        result = code ? code : EIO;
        if (error_size > 0) snprintf(error, (size_t)error_size, "%s", text);
    } else if (result == 0 && (got != 0 || !ready || server <= 0)) {
        result = EIO;
        step = ready ? "hear from the server" : "start the child (it ended before its user namespace was made)";
    }
    if (result != 0) {
        if (step && error_size > 0) snprintf(error, (size_t)error_size, "%s", step);
        if (child > 0) {
            kill(child, SIGKILL);
            waitpid(child, NULL, 0);
        }
        if (server > 0) kill(server, SIGKILL);
    } else {
        *pid = server;
    }
out:
    for (int i = 0; i < made; i++) close(high[i]);
    close(log_high);
    for (int i = 0; i < 2; i++) {
        if (to_child[i] >= 0) close(to_child[i]);
        if (from_child[i] >= 0) close(from_child[i]);
    }
    return result;
}
