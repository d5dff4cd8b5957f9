#define _GNU_SOURCE
#include "chostsupport.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int vireo_spawn_detached(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd, pid_t *pid) {
    return vireo_spawn_detached_inheriting(path, argv, log_fd, lock_fd, ready_fd, NULL, 0, pid);
}

int vireo_spawn_detached_inheriting(const char *path, char *const argv[], int log_fd, int lock_fd, int ready_fd,
                                    const int *inherit, int inherit_count, pid_t *pid) {
    enum { MAX_INHERIT = 64 };
    if (inherit_count < 0 || inherit_count > MAX_INHERIT) return EINVAL;
    // Move the descriptors well above every target first, so no dup2 below has source == target
    // (which would leave close-on-exec set).
    int floor = 10 + inherit_count;
    int log_high = fcntl(log_fd, F_DUPFD_CLOEXEC, floor);
    int lock_high = lock_fd < 0 ? -1 : fcntl(lock_fd, F_DUPFD_CLOEXEC, floor);
    int ready_high = ready_fd < 0 ? -1 : fcntl(ready_fd, F_DUPFD_CLOEXEC, floor);
    int high[MAX_INHERIT];
    int made = 0;
    int result = 0;
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    if (log_high < 0 || (lock_fd >= 0 && lock_high < 0) || (ready_fd >= 0 && ready_high < 0)) { result = errno; goto out; }
    for (; made < inherit_count; made++) {
        high[made] = fcntl(inherit[made], F_DUPFD_CLOEXEC, floor);
        if (high[made] < 0) { result = errno; goto out; }
    }
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attributes);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, log_high, 1);
    posix_spawn_file_actions_adddup2(&actions, log_high, 2);
    if (lock_high >= 0) posix_spawn_file_actions_adddup2(&actions, lock_high, 3);
    if (ready_high >= 0) posix_spawn_file_actions_adddup2(&actions, ready_high, 4);
    // Inherited descriptors land on 5, 6, ... in the order given.
    for (int i = 0; i < inherit_count; i++) posix_spawn_file_actions_adddup2(&actions, high[i], 5 + i);
    posix_spawn_file_actions_addclosefrom_np(&actions, 5 + inherit_count);
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attributes, &empty);
    posix_spawnattr_setsigdefault(&attributes, &all);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    result = posix_spawn(pid, path, &actions, &attributes, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
out:
    for (int i = 0; i < made; i++) close(high[i]);
    if (log_high >= 0) close(log_high);
    if (lock_high >= 0) close(lock_high);
    if (ready_high >= 0) close(ready_high);
    return result;
}

int vireo_spawn_piped(const char *file, char *const argv[], char *const envp[], int in_fd, int out_fd, int err_fd, pid_t *pid) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attributes);
    posix_spawn_file_actions_adddup2(&actions, in_fd, 0);
    posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
    posix_spawn_file_actions_adddup2(&actions, err_fd, 2);
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attributes, &empty);
    posix_spawnattr_setsigdefault(&attributes, &all);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    int result = posix_spawnp(pid, file, &actions, &attributes, argv, envp ? envp : environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    return result;
}

int vireo_run_collecting(const char *file, char *const argv[], unsigned char *buffer, size_t capacity, size_t *length) {
    int ends[2];
    *length = 0;
    if (pipe2(ends, O_CLOEXEC) != 0) return -errno;
    int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    pid_t pid = 0;
    int spawned = vireo_spawn_piped(file, argv, NULL, in < 0 ? 0 : in, ends[1], ends[1], &pid);
    if (in >= 0) close(in);
    close(ends[1]);
    if (spawned != 0) { close(ends[0]); return -spawned; }
    unsigned char scratch[4096];
    for (;;) {
        ssize_t count = read(ends[0], scratch, sizeof scratch);
        if (count < 0 && errno == EINTR) continue;
        if (count <= 0) break;
        size_t take = (size_t)count;
        if (take > capacity - *length) take = capacity - *length;
        memcpy(buffer + *length, scratch, take);
        *length += take;
    }
    close(ends[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) { if (errno != EINTR) return -errno; }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int vireo_rename_noreplace(const char *from, const char *to) {
    return renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0 ? 0 : errno;
}

int vireo_copy_sparse(const char *from, const char *to) {
    return vireo_copy_sparse_reporting(from, to, NULL, NULL);
}

int vireo_copy_sparse_reporting(const char *from, const char *to,
                                void (*report)(void *context, uint64_t done, uint64_t total), void *context) {
    /* Copies in steps of at most this much, so a caller hears about a long extent as it goes. */
    const size_t step = 64u << 20;
    int in = open(from, O_RDONLY | O_CLOEXEC);
    if (in < 0) return errno;
    struct stat info;
    if (fstat(in, &info) != 0) { int e = errno; close(in); return e; }
    int out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, info.st_mode & 0777);
    if (out < 0) { int e = errno; close(in); return e; }
    int result = 0;
    off_t position = 0;
    while (position < info.st_size) {
        off_t data = lseek(in, position, SEEK_DATA);
        if (data < 0) { if (errno == ENXIO) break; result = errno; goto done; }
        off_t hole = lseek(in, data, SEEK_HOLE);
        if (hole < 0) { result = errno; goto done; }
        off_t source = data, target = data;
        while (source < hole) {
            size_t wanted = (size_t)(hole - source) < step ? (size_t)(hole - source) : step;
            ssize_t copied = copy_file_range(in, &source, out, &target, wanted, 0);
            if (copied < 0) { if (errno == EINTR) continue; result = errno; goto done; }
            if (copied == 0) break;
            if (report) report(context, (uint64_t)source, (uint64_t)info.st_size);
        }
        position = hole;
    }
    if (report) report(context, (uint64_t)info.st_size, (uint64_t)info.st_size);
    if (ftruncate(out, info.st_size) != 0 || fsync(out) != 0) result = errno;
done:
    close(in);
    close(out);
    if (result != 0) unlink(to);
    return result;
}

#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>

static int tap_open(const char *name, int extra_flags) {
    if (strlen(name) >= IFNAMSIZ) return -ENAMETOOLONG;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    request.ifr_flags = (short)(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra_flags);
    if (ioctl(fd, TUNSETIFF, &request) != 0) { int e = errno; close(fd); return -e; }
    /* The virtio 1.x header: virtio_net_hdr_v1, 12 bytes with num_buffers. */
    int size = 12;
    if (ioctl(fd, TUNSETVNETHDRSZ, &size) != 0) { int e = errno; close(fd); return -e; }
    return fd;
}

int vireo_tap_open(const char *name) { return tap_open(name, 0); }

int vireo_tap_open_queue(const char *name) { return tap_open(name, IFF_MULTI_QUEUE); }

int vireo_tap_set_queue_enabled(int fd, int enabled) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    request.ifr_flags = enabled ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE;
    return ioctl(fd, TUNSETQUEUE, &request) == 0 ? 0 : -errno;
}

#include <linux/nsfs.h>
#include <pthread.h>
#include <sched.h>

struct vireo_netns_tap { const char *netns; const char *name; int queues; int *descriptors; int result; };

static void *vireo_netns_tap_thread(void *raw) {
    struct vireo_netns_tap *job = raw;
    int ns = open(job->netns, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (ns < 0) { job->result = -errno; return NULL; }
    if (ioctl(ns, NS_GET_NSTYPE) != CLONE_NEWNET) { close(ns); job->result = -EINVAL; return NULL; }
    /* Only this thread joins; it ends once the tap exists. */
    if (setns(ns, CLONE_NEWNET) != 0) { job->result = -errno; close(ns); return NULL; }
    close(ns);
    /* More than one queue: a multiqueue tap, the first descriptor making it, the others attaching. */
    for (int index = 0; index < job->queues; index++) {
        int fd = job->queues > 1 ? vireo_tap_open_queue(job->name) : vireo_tap_open(job->name);
        if (fd < 0) {
            for (int opened = 0; opened < index; opened++) close(job->descriptors[opened]);
            job->result = fd;
            return NULL;
        }
        job->descriptors[index] = fd;
    }
    job->result = 0;
    return NULL;
}

int vireo_tap_open_in_netns(const char *netns, const char *name, int queues, int *descriptors) {
    if (queues < 1) return -EINVAL;
    struct vireo_netns_tap job = { netns, name, queues, descriptors, -EINVAL };
    pthread_t thread;
    int made = pthread_create(&thread, NULL, vireo_netns_tap_thread, &job);
    if (made != 0) return -made;
    pthread_join(thread, NULL);
    return job.result;
}

int vireo_tap_is_multiqueue(int fd) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (ioctl(fd, TUNGETIFF, &request) != 0) return -errno;
    return (request.ifr_flags & IFF_MULTI_QUEUE) ? 1 : 0;
}

int vireo_tap_name(int fd, char *name, int capacity) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (ioctl(fd, TUNGETIFF, &request) != 0) return -errno;
    if (!(request.ifr_flags & IFF_TAP)) return -EINVAL;
    snprintf(name, (size_t)capacity, "%s", request.ifr_name);
    return 0;
}

int vireo_tap_has_vnet_header(int fd) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (ioctl(fd, TUNGETIFF, &request) != 0) return -errno;
    if (!(request.ifr_flags & IFF_VNET_HDR)) return 0;
    int size = 12;
    if (ioctl(fd, TUNSETVNETHDRSZ, &size) != 0) return -errno;
    return 1;
}

int vireo_tap_set_offloads(int fd, int checksum, int tso4, int tso6, int ecn) {
    unsigned flags = 0;
    if (checksum) flags |= TUN_F_CSUM;
    /* Segmentation offloads need checksum offload (the kernel refuses them alone). */
    if (checksum && tso4) flags |= TUN_F_TSO4;
    if (checksum && tso6) flags |= TUN_F_TSO6;
    if (checksum && ecn && (tso4 || tso6)) flags |= TUN_F_TSO_ECN;
    return ioctl(fd, TUNSETOFFLOAD, flags) == 0 ? 0 : -errno;
}

int vireo_eventfd_nonblocking(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

#include <sys/socket.h>

long vireo_send_with_descriptor(int socket, const void *data, size_t length, int fd) {
    struct iovec part = { .iov_base = (void *)data, .iov_len = length };
    union { char buffer[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr message = { .msg_iov = &part, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &fd, sizeof(int));
    ssize_t sent;
    do { sent = sendmsg(socket, &message, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    return sent < 0 ? -errno : (long)sent;
}

long vireo_send_with_descriptors(int socket, const void *data, size_t length, const int *fds, int count) {
    if (count < 0 || count > 8) return -EINVAL;
    struct iovec part = { .iov_base = (void *)data, .iov_len = length };
    union { char buffer[CMSG_SPACE(sizeof(int) * 8)]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr message = { .msg_iov = &part, .msg_iovlen = 1 };
    if (count > 0) {
        message.msg_control = control.buffer;
        message.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)count);
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
        memcpy(CMSG_DATA(header), fds, sizeof(int) * (size_t)count);
    }
    ssize_t sent;
    do { sent = sendmsg(socket, &message, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    return sent < 0 ? -errno : (long)sent;
}

long vireo_receive_with_descriptor(int socket, void *data, size_t capacity, int *fd) {
    *fd = -1;
    struct iovec part = { .iov_base = data, .iov_len = capacity };
    union { char buffer[CMSG_SPACE(sizeof(int) * 8)]; struct cmsghdr align; } control;
    struct msghdr message = { .msg_iov = &part, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer };
    ssize_t received;
    do { received = recvmsg(socket, &message, MSG_CMSG_CLOEXEC); } while (received < 0 && errno == EINTR);
    if (received < 0) return -errno;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int passed;
            memcpy(&passed, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
            if (*fd < 0) *fd = passed; else close(passed);
        }
    }
    return (long)received;
}

void vireo_bitmap_set_range(uint64_t *words, size_t first, size_t count) {
    while (count > 0) {
        size_t word = first / 64, bit = first % 64;
        size_t take = 64 - bit < count ? 64 - bit : count;
        uint64_t mask = take == 64 ? ~(uint64_t)0 : (((uint64_t)1 << take) - 1) << bit;
        if ((__atomic_load_n(&words[word], __ATOMIC_RELAXED) & mask) != mask) __atomic_fetch_or(&words[word], mask, __ATOMIC_RELEASE);
        first += take;
        count -= take;
    }
}

void vireo_bitmap_take(uint64_t *words, uint64_t *into, size_t count) {
    for (size_t i = 0; i < count; i++) {
        if (__atomic_load_n(&words[i], __ATOMIC_RELAXED) == 0) continue;
        into[i] |= __atomic_exchange_n(&words[i], 0, __ATOMIC_ACQUIRE);
    }
}

#include <sched.h>

int vireo_set_affinity(pid_t tid, const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) return EINVAL;
        CPU_SET(cpus[i], &set);
    }
    return sched_setaffinity(tid, sizeof set, &set) == 0 ? 0 : errno;
}

int vireo_get_affinity(pid_t tid, int *cpus, int capacity) {
    cpu_set_t set;
    if (sched_getaffinity(tid, sizeof set, &set) != 0) return -errno;
    int count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && count < capacity; cpu++) if (CPU_ISSET(cpu, &set)) cpus[count++] = cpu;
    return count;
}

int vireo_guest_memfd(const char *name) {
    return memfd_create(name, MFD_CLOEXEC);
}

int vireo_sealed_memfd(const char *name, const void *bytes, size_t length) {
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    size_t done = 0;
    while (done < length) {
        ssize_t written = write(fd, (const char *)bytes + done, length - done);
        if (written < 0 && errno == EINTR) continue;
        if (written <= 0) { int saved = errno; close(fd); errno = saved ? saved : EIO; return -1; }
        done += (size_t)written;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
        int saved = errno; close(fd); errno = saved; return -1;
    }
    return fd;
}

int vireo_file_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

int vireo_bind_to_numa_node(void *address, unsigned long length, int node) {
    enum { MPOL_BIND_MODE = 2, MF_MOVE = 1 << 1 };
    if (node < 0 || node >= 1024) { errno = EINVAL; return -1; }
    unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {0};
    mask[node / (8 * sizeof(unsigned long))] = 1UL << (node % (8 * sizeof(unsigned long)));
    return (int)syscall(SYS_mbind, address, length, MPOL_BIND_MODE, mask, 1024UL, MF_MOVE);
}

/* A helper process that must not outlive its parent (stunnel in front of `vireo serve`): the
 * kernel sends it SIGKILL when the parent dies, however it dies (stunnel blocks SIGTERM in
 * every thread but one and was seen to outlive it). stdout/stderr go to log_fd;
 * every other descriptor is closed. Only async-signal-safe calls between fork and exec. */
int vireo_spawn_tied(const char *path, char *const argv[], int log_fd, pid_t *pid) {
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) return errno;
    if (child == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) _exit(127);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(log_fd, 1) < 0 || dup2(log_fd, 2) < 0) _exit(127);
        for (int fd = 3; fd < 4096; fd++) close(fd);
        execv(path, argv);
        _exit(127);
    }
    *pid = child;
    return 0;
}
