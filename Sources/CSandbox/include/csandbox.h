#ifndef VIREO_CSANDBOX_H
#define VIREO_CSANDBOX_H
#include <sys/types.h>
#include <stdint.h>

/// What a thread may call beyond the syscall names: argument-checked rules, OR-ed together.
enum {
    VIREO_SECCOMP_IOCTL_KVM = 1,        // ioctl with a KVM request (type 0xAE)
    VIREO_SECCOMP_IOCTL_TTY_TUN = 2,    // ioctl with a tty or tun request (type 'T', 0x54)
    VIREO_SECCOMP_SOCKET_UNIX = 4,      // socket(AF_UNIX, ...) only
    VIREO_SECCOMP_CLONE_THREAD = 8,     // clone only for threads (CLONE_THREAD); clone3 answers ENOSYS
    VIREO_SECCOMP_SIGNAL_SELF = 16,     // tgkill/kill only to this process
    VIREO_SECCOMP_OPEN_REFUSED = 32,    // open/openat fail with EACCES instead of trapping
    VIREO_SECCOMP_IOCTL_DISCARD = 64,   // ioctl BLKDISCARD exactly: a guest's discard on a block-device disk
};

/// Compiles a seccomp filter into slot `kind` (0–7) that allows `names` plus the `rules` above,
/// and otherwise traps (SIGSYS, see vireo_seccomp_catch_violations) or, with `log_only`, allows
/// and logs to the kernel log. Done once on the main thread: threads then install it with
/// vireo_seccomp_apply without allocating (each thread that mallocs gets glibc an arena of its
/// own, which made per-thread compiling cost a VMM 600 KiB). Returns 0, or an errno with `error`
/// naming what failed (an unknown syscall name, ...).
int vireo_seccomp_prepare(int kind, const char *const *names, int count, unsigned rules, int log_only,
                          char *error, int error_size);

/// Installs the filter prepared in slot `kind` on the calling thread (and threads it starts
/// later), setting no_new_privs first. Returns 0 or an errno.
int vireo_seccomp_apply(int kind);

/// Installs the SIGSYS handler: it writes "seccomp: forbidden system call NR from thread NAME"
/// to `log_fd` and ends the process with exit status 159 (128 + SIGSYS).
int vireo_seccomp_catch_violations(int log_fd);

/// The syscall number's name for this architecture (libseccomp's table), or NULL. Free it.
char *vireo_seccomp_syscall_name(int number);

/// The Landlock ABI version the kernel offers, or 0 (absent or disabled; errno says which).
int vireo_landlock_abi(void);

/// Landlock: the calling thread (and threads it starts) may from now on reach only `paths`,
/// `writable[i]` saying whether path i may be written, created in and removed from (a directory)
/// or written (a file). Needs no_new_privs. Returns 0 or an errno, `failed` the index of the path.
int vireo_landlock_restrict(const char *const *paths, const int *writable, int count, int *failed);

/// Like vireo_landlock_restrict, and paths with `executable[i]` may also be executed (their
/// programs and libraries: a confined process that still has to exec one).
int vireo_landlock_restrict_exec(const char *const *paths, const int *writable, const int *executable, int count, int *failed);

/// The jail step of the VMM, for a single-threaded process already in its own mount namespace:
/// mounts a tmpfs at `root`, bind-mounts each of `paths` at the same path inside it (read-only
/// unless `writable[i]`), a private /proc, then pivot_root()s into it and drops the old root.
/// Returns 0 or an errno, `failed` naming the step in a message.
int vireo_jail_pivot(const char *root, const char *const *paths, const int *writable, int count,
                     char *error, int error_size);

/// New mount, IPC, UTS and network namespaces for the calling (single-threaded) process, so the
/// jail never touches the host's mounts even when the spawner made none. Returns 0 or an errno.
int vireo_jail_unshare(void);

/// No core dumps, at most `files` descriptors. Returns 0 or an errno.
int vireo_jail_limit_resources(unsigned long files);

/// Drops to `uid`/`gid` with no supplementary groups and every capability gone — but
/// CAP_SYS_NICE and CAP_IPC_LOCK with `keep_realtime` (a real-time VM's vCPUs make themselves
/// SCHED_FIFO and its locked memory grows with each thread) — and sets no_new_privs.
/// Returns 0 or an errno.
int vireo_jail_drop_privileges(uid_t uid, gid_t gid, int keep_realtime);

/// Like vireo_spawn_detached_inheriting (chostsupport.h), but the child starts in new PID, mount,
/// IPC and UTS namespaces (so it is PID 1 of its own namespace), and joins the control groups
/// whose `cgroup.procs` files are given before it execs, so everything it ever allocates is
/// charged to them. Returns 0 or an errno.
int vireo_spawn_namespaced(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd,
                           const int *inherit, int inherit_count, char *const *cgroup_procs, int cgroup_count,
                           pid_t *pid);

/// What a program that cannot confine itself (QEMU) is confined with before it execs: new PID,
/// mount, IPC, UTS and network namespaces, a root holding only `paths` (read-only unless
/// `writable[i]`; `executable[i]` also for Landlock), no core dumps, `uid`/`gid` with the single
/// supplementary group `group` (e.g. kvm's; 0 for none), no capabilities, no_new_privs, and
/// Landlock over the same paths when the kernel has it.
struct vireo_jail_spec {
    const char *root;
    const char *const *paths;
    const int *writable;
    const int *executable;
    int count;
    uid_t uid;
    gid_t gid;
    gid_t group;
    int landlock;
};

/// vireo_spawn_namespaced, confining the child with `jail` before it execs `path` (which must be
/// among the jail's executable paths). A failure to confine ends the child before the exec, and
/// its errno is returned with `error` saying which step failed.
int vireo_spawn_jailed(const char *path, char *const argv[], int log_fd, int lock_fd,
                       const int *inherit, int inherit_count, char *const *cgroup_procs, int cgroup_count,
                       const struct vireo_jail_spec *jail, char *error, int error_size, pid_t *pid);

/// A virtiofsd for one shared folder (docs/shared-folders.md): `source` (its real path, which must
/// still be the directory `source_dev`/`source_ino` names when it is bound) is bound on
/// `mount_point` in a mount namespace of its own, nosuid and nodev (and read-only when asked),
/// then the child enters a new user namespace whose `uid_map`/`gid_map` root writes, becomes its
/// root and execs `path`. So the server's root is an unprivileged host uid and the guest can
/// reach nothing but the directory, whatever it asks. `inherit[i]` becomes descriptor 3 + i;
/// stdout and stderr go to `log_fd`. The server is a grandchild (its parent ends at once), so it is
/// not the caller's child: `pid` is for signals only. Returns 0 or an errno, with `error` naming
/// the failed step.
struct vireo_share_server_spec {
    const char *source;
    dev_t source_dev;
    ino_t source_ino;
    const char *mount_point;
    int read_only;
    const char *uid_map;
    const char *gid_map;
};

int vireo_spawn_share_server(const char *path, char *const argv[], int log_fd, const int *inherit, int inherit_count,
                             const struct vireo_share_server_spec *spec, char *error, int error_size, pid_t *pid);

#endif
