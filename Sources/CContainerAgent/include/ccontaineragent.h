#ifndef CCONTAINERAGENT_H
#define CCONTAINERAGENT_H
#include <stdint.h>
#include <sys/types.h>

/// One process for the container agent to start (vireo-container-agent). The fork and the
/// child's steps are C: the child runs no Swift runtime code between fork and exec.
struct agent_spawn {
    const char *const *candidates;  /* paths to try for the program, in order */
    int candidate_count;
    char *const *argv;
    char *const *envp;
    const char *root;               /* the container's root file system (chroot) */
    const char *cwd;
    const char *hostname;           /* set in the new UTS namespace; "" leaves it */
    uint32_t uid, gid;
    const uint32_t *groups;
    int group_count;
    int terminal;
    uint16_t width, height;
    int want_stdin;
    int join_pid;                   /* 0: new PID, mount, UTS and IPC namespaces; else join this process's */
    /* results */
    int pid, stdin_fd, stdout_fd, stderr_fd, pty_fd;
    int failed_step, failed_errno;
};

/// 0 when the process runs (its program executed); -1 with failed_step and failed_errno set.
int agent_spawn(struct agent_spawn *spawn);

/// A vsock listener on `port` (any CID), accepting one connection; -1 with errno.
int agent_vsock_accept(uint32_t port);

/// Blocks SIGCHLD and returns a non-blocking signalfd for it.
int agent_child_signals(void);
void agent_drain_signals(int fd);

/// Brings the loopback interface up.
void agent_loopback_up(void);

int agent_resize(int pty, uint16_t width, uint16_t height);

/// Gives `interface` the IPv6 `address`/`prefix` (no duplicate detection) and, with a gateway,
/// the default IPv6 route through it: what the kernel's `ip=` does for IPv4. 0, or -1 with errno
/// and `failed_step` 1 (no such interface), 2 (the address), 3 (the route); 0 for bad input (EINVAL).
int agent_configure_ipv6(const char *interface, const char *address, int prefix, const char *gateway, int *failed_step);

/// Finds the virtio disk (/dev/vd*) holding the ext4 file system with this UUID, dropping each
/// disk's cached blocks first (a disk the host filled after the guest's boot-time scan would
/// otherwise read as the zeros it had then). Writes its path into `path`; 0, or -1 with errno.
int agent_find_ext4(const uint8_t uuid[16], char *path, size_t size);
#endif
