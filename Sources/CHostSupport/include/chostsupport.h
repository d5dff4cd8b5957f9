// Host process and file operations the VM library needs that Swift's Glibc module does not
// export (they need _GNU_SOURCE or are Linux-specific).
#ifndef VIREO_CHOSTSUPPORT_H
#define VIREO_CHOSTSUPPORT_H

#include <sys/types.h>
#include <stddef.h>
#include <stdint.h>

// lseek's SEEK_DATA and SEEK_HOLE (Linux), which Swift's Glibc module leaves out (they need
// _GNU_SOURCE). A file system without them answers as if the file had no holes.
#define VIREO_SEEK_DATA 3
#define VIREO_SEEK_HOLE 4

// Starts `path` in a new session with default signal dispositions and an empty signal mask:
// stdin /dev/null, stdout and stderr to `log_fd`, `lock_fd` as descriptor 3 and `ready_fd` as
// descriptor 4 (either may be -1: not passed); every other descriptor closed. Returns 0 and the child's pid, or an errno value.
int vireo_spawn_detached(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd, pid_t *pid);
/// Runs `file` (searched in PATH) with stdin, stdout and stderr on the given descriptors and
/// nothing else open, default signal handling, `envp` (NULL: this process's). 0 or an errno.
/// Foundation's Process is avoided: Swift 6.3's reads past a buffer while listing /proc/self/fd
/// and crashes now and then (swift-corelibs-foundation #5472).
/// Forks and execs `path`, which gets SIGKILL when this process dies (PR_SET_PDEATHSIG); its
/// stdout and stderr go to `log_fd`, stdin is /dev/null, nothing else is inherited.
int vireo_spawn_tied(const char *path, char *const argv[], int log_fd, pid_t *pid);

int vireo_spawn_piped(const char *file, char *const argv[], char *const envp[], int in_fd, int out_fd, int err_fd, pid_t *pid);
/// Runs `file` (PATH searched) to completion with stdin from /dev/null, collecting stdout and
/// stderr together (up to `capacity` bytes kept). Exit status, 128+signal, or -errno.
int vireo_run_collecting(const char *file, char *const argv[], unsigned char *buffer, size_t capacity, size_t *length);
/// As vireo_spawn_detached, and the child also gets `inherit[i]` as descriptor 5 + i.
int vireo_spawn_detached_inheriting(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd,
                                    const int *inherit, int inherit_count, pid_t *pid);

// rename(2) that fails with EEXIST instead of replacing an existing target (RENAME_NOREPLACE).
// Returns 0 or an errno value.
int vireo_rename_noreplace(const char *from, const char *to);

// Copies `from` to the new file `to` (which must not exist), keeping holes: only data ranges
// are copied, so a thin image stays thin. Returns 0 or an errno value.
int vireo_copy_sparse(const char *from, const char *to);
/* The same, calling `report` with how far through the file it is (bytes, of its size). */
int vireo_copy_sparse_reporting(const char *from, const char *to,
                                void (*report)(void *context, uint64_t done, uint64_t total), void *context);



// Opens (or creates, with CAP_NET_ADMIN) the tap device `name` without packet information
// headers, with the 12-byte virtio-net header on every frame, non-blocking and close-on-exec.
// Returns the descriptor, or -errno.
int vireo_tap_open(const char *name);
/* One queue of a multiqueue tap (IFF_MULTI_QUEUE): each call attaches another; made if missing.
 * A tap made without IFF_MULTI_QUEUE refuses it (EINVAL). Returns the descriptor or -errno. */
int vireo_tap_open_queue(const char *name);
/* Attaches or detaches a multiqueue tap's queue (TUNSETQUEUE): the kernel steers no frames to a
 * detached one. 0 or -errno. */
int vireo_tap_set_queue_enabled(int fd, int enabled);
/* 1 if the open tap is a queue of a multiqueue tap, 0 if not, -errno. */
int vireo_tap_is_multiqueue(int fd);
// The same, made inside the network namespace the nsfs file `netns` names (a CNI pod's), from
// a thread that joins it and ends: the caller's own namespace never changes, and the tap stays
// in that namespace while its descriptors work from anywhere. `queues` descriptors go into
// `descriptors` (more than one: a multiqueue tap, one descriptor per queue). 0, -EINVAL when
// `netns` is not a network namespace, or -errno (and nothing left open).
int vireo_tap_open_in_netns(const char *netns, const char *name, int queues, int *descriptors);
// 1 if the tap open on `fd` carries virtio-net headers (then sized to 12 bytes), 0 if not, -errno.
int vireo_tap_has_vnet_header(int fd);
// What the kernel may hand the tap's reader: partial checksums and TCP segments up to 64 KiB
// (TUNSETOFFLOAD). 0 or -errno.
int vireo_tap_set_offloads(int fd, int checksum, int tso4, int tso6, int ecn);
// The name of the tap device open on `fd` (a handed-over descriptor). 0, or -errno (-EINVAL: a
// tun device, not a tap).
int vireo_tap_name(int fd, char *name, int capacity);

// A non-blocking, close-on-exec eventfd(2) starting at 0; -1 with errno on failure.
int vireo_eventfd_nonblocking(void);

// Sends `length` bytes on the Unix socket `socket` with `fd` attached (SCM_RIGHTS). Returns the
// bytes sent, or -errno.
long vireo_send_with_descriptor(int socket, const void *data, size_t length, int fd);
// Sends `length` bytes on the Unix socket `socket` with the `count` (0 to 8) descriptors `fds`
// attached in one SCM_RIGHTS message (vhost-user's memory table and vring descriptors). Returns
// the bytes sent, or -errno.
long vireo_send_with_descriptors(int socket, const void *data, size_t length, const int *fds, int count);
// Receives up to `capacity` bytes from the Unix socket `socket`; a descriptor that came with
// them is stored (close-on-exec) in *fd, else *fd = -1. Extra descriptors are closed. Returns
// the bytes received (0 at end of stream), or -errno.
long vireo_receive_with_descriptor(int socket, void *data, size_t capacity, int *fd);

// Atomically sets bits [first, first + count) of the bitmap `words` (dirty-page tracking, which
// several device threads update at once).
void vireo_bitmap_set_range(uint64_t *words, size_t first, size_t count);
// Atomically moves `count` words of `words` into `into` (ORed in) and clears them.
void vireo_bitmap_take(uint64_t *words, uint64_t *into, size_t count);


// Restricts thread (or process) `tid` to the `count` CPUs listed in `cpus` (sched_setaffinity).
// Returns 0 or an errno value.
int vireo_set_affinity(pid_t tid, const int *cpus, int count);
// The CPUs thread `tid` may run on, written to `cpus` (up to `capacity`); the count, or -errno.
int vireo_get_affinity(pid_t tid, int *cpus, int capacity);
/// A close-on-exec memfd for guest RAM, or -1 with errno.
int vireo_guest_memfd(const char *name);

/// A close-on-exec memfd holding `length` bytes, sealed against any change (write, grow, shrink,
/// more seals): what a child inherits and reads, knowing nobody can alter it. -1 with errno.
int vireo_sealed_memfd(const char *name, const void *bytes, size_t length);

/// Frees [offset, offset+length) of a file, keeping its size (the range reads as zeros). 0 or -1 with errno.
int vireo_file_punch_hole(int fd, long long offset, long long length);

/// Binds [address, address+length) to NUMA node `node` (mbind MPOL_BIND, pages already there
/// moved). 0 or -1 with errno.
int vireo_bind_to_numa_node(void *address, unsigned long length, int node);

#endif
