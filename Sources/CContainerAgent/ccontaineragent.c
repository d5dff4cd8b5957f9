#define _GNU_SOURCE
#include "ccontaineragent.h"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <dirent.h>
#include <arpa/inet.h>
#include <linux/fs.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

/* The terminal's master goes from the child (which made it in the container's devpts) to the
 * agent over a socket pair. */
static int send_descriptor(int socket, int fd) {
    char byte = 0;
    struct iovec data = {.iov_base = &byte, .iov_len = 1};
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof control);
    struct msghdr message = {.msg_iov = &data, .msg_iovlen = 1, .msg_control = control.space, .msg_controllen = sizeof control.space};
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &fd, sizeof fd);
    return sendmsg(socket, &message, MSG_NOSIGNAL) == 1 ? 0 : -1;
}

static int receive_descriptor(int socket) {
    char byte;
    struct iovec data = {.iov_base = &byte, .iov_len = 1};
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    struct msghdr message = {.msg_iov = &data, .msg_iovlen = 1, .msg_control = control.space, .msg_controllen = sizeof control.space};
    ssize_t got;
    do got = recvmsg(socket, &message, MSG_CMSG_CLOEXEC); while (got < 0 && errno == EINTR);
    struct cmsghdr *header = got == 1 ? CMSG_FIRSTHDR(&message) : NULL;
    if (!header || header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS || header->cmsg_len != CMSG_LEN(sizeof(int))) {
        if (got >= 0) errno = EPROTO;
        return -1;
    }
    int fd;
    memcpy(&fd, CMSG_DATA(header), sizeof fd);
    return fd;
}

static void child_fail(int report, int step) {
    int message[2] = {step, errno};
    (void)!write(report, message, sizeof message);
    _exit(127);
}

static int open_namespace(int pid, const char *kind) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/%s", pid, kind);
    return open(path, O_RDONLY | O_CLOEXEC);
}

/* The container's /dev: a tmpfs with the OCI default devices bound from the VM's, a devpts of
 * its own and /dev/shm. Not the VM's whole /dev: the disks of a pod's other containers are in
 * it; and not the VM's devpts, where one container's root could open another's terminal. */
static int setup_dev(const char *dev) {
    char path[4200];
    if (mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=65536k")) return -1;
    const char *nodes[] = {"null", "zero", "full", "random", "urandom", "tty"};
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
        char source[64];
        snprintf(source, sizeof source, "/dev/%s", nodes[i]);
        snprintf(path, sizeof path, "%s/%s", dev, nodes[i]);
        int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0666);
        if (fd < 0) return -1;
        close(fd);
        if (mount(source, path, NULL, MS_BIND, NULL)) return -1;
    }
    snprintf(path, sizeof path, "%s/pts", dev);
    mkdir(path, 0755);
    if (mount("devpts", path, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")) return -1;
    snprintf(path, sizeof path, "%s/ptmx", dev);
    if (symlink("pts/ptmx", path)) return -1;
    snprintf(path, sizeof path, "%s/shm", dev);
    mkdir(path, 01777);
    if (mount("shm", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")) return -1;
    const char *links[][2] = {{"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"}, {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"}};
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", dev, links[i][1]);
        if (symlink(links[i][0], path)) return -1;
    }
    return 0;
}

int agent_spawn(struct agent_spawn *s) {
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, report[2] = {-1, -1}, handoff[2] = {-1, -1};
    int master = -1, null_fd = -1, own_pid_ns = -1;
    int joined[4] = {-1, -1, -1, -1};
    s->pid = -1; s->stdin_fd = s->stdout_fd = s->stderr_fd = s->pty_fd = -1;
    s->failed_step = 0; s->failed_errno = 0;
#define FAIL(step) do { s->failed_step = (step); s->failed_errno = errno; goto cleanup; } while (0)
    if (s->join_pid) {
        const char *kinds[4] = {"pid", "mnt", "uts", "ipc"};
        for (int i = 0; i < 4; i++) if ((joined[i] = open_namespace(s->join_pid, kinds[i])) < 0) FAIL(2);
    }
    if (s->terminal) {
        /* The terminal is made by the child, in the container's own devpts. */
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, handoff)) FAIL(13);
    } else {
        if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) FAIL(13);
    }
    if (pipe2(report, O_CLOEXEC)) FAIL(13);
    null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    own_pid_ns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
    if (s->join_pid) { if (setns(joined[0], CLONE_NEWPID)) FAIL(2); }
    else if (unshare(CLONE_NEWPID)) FAIL(2);
    pid_t pid = fork();
    if (pid == 0) {
        int r = report[1];
        setsid();
        if (!s->terminal) {
            dup2(s->want_stdin ? in[0] : null_fd, 0);
            dup2(out[1], 1);
            dup2(err[1], 2);
        }
        if (s->join_pid) {
            if (setns(joined[1], CLONE_NEWNS) || setns(joined[2], CLONE_NEWUTS) || setns(joined[3], CLONE_NEWIPC)) child_fail(r, 2);
        } else {
            char path[4096];
            if (unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)) child_fail(r, 2);
            if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) child_fail(r, 3);
            snprintf(path, sizeof path, "%s/proc", s->root);
            mkdir(path, 0555);
            if (mount("proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) child_fail(r, 4);
            snprintf(path, sizeof path, "%s/dev", s->root);
            mkdir(path, 0755);
            if (setup_dev(path)) child_fail(r, 5);
            if (s->hostname[0] && sethostname(s->hostname, strlen(s->hostname))) child_fail(r, 6);
        }
        if (chroot(s->root)) child_fail(r, 7);
        if (s->terminal) {
            /* The container's devpts (made with its /dev, or joined with its mounts): the slave
             * is opened from the master itself, whatever path the devpts has, and becomes this
             * session's controlling terminal. */
            int pty = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
            if (pty < 0 || unlockpt(pty) != 0) child_fail(r, 1);
            if (s->width && s->height) agent_resize(pty, s->width, s->height);
            int slave = ioctl(pty, TIOCGPTPEER, O_RDWR);
            if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) != 0) child_fail(r, 1);
            dup2(slave, 0); dup2(slave, 1); dup2(slave, 2);
            if (slave > 2) close(slave);
            if (send_descriptor(handoff[1], pty)) child_fail(r, 1);
            close(pty);
        }
        if (chdir(s->cwd)) child_fail(r, 8);
        if (setgroups((size_t)s->group_count, (const gid_t *)s->groups)) child_fail(r, 9);
        if (setgid(s->gid)) child_fail(r, 10);
        if (setuid(s->uid)) child_fail(r, 11);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        int last = ENOENT;
        for (int i = 0; i < s->candidate_count; i++) {
            execve(s->candidates[i], s->argv, s->envp);
            if (errno != ENOENT && errno != ENOTDIR) last = errno;
        }
        errno = last;
        child_fail(r, 12);
    }
    int fork_errno = errno;
    if (own_pid_ns >= 0) (void)!setns(own_pid_ns, CLONE_NEWPID);
    if (pid < 0) { errno = fork_errno; FAIL(14); }
    close(report[1]); report[1] = -1;
    if (handoff[1] >= 0) { close(handoff[1]); handoff[1] = -1; }
    int message[2];
    ssize_t got;
    do got = read(report[0], message, sizeof message); while (got < 0 && errno == EINTR);
    if (got == (ssize_t)sizeof message) {
        waitpid(pid, NULL, 0);
        s->failed_step = message[0];
        s->failed_errno = message[1];
        goto cleanup;
    }
    if (s->terminal) {
        /* Sent before the exec the report pipe's closing announced. */
        master = receive_descriptor(handoff[0]);
        if (master < 0) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            FAIL(1);
        }
        fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);
        s->pid = pid;
        s->pty_fd = master; master = -1;
    } else {
        s->pid = pid;
        close(in[0]); close(out[1]); close(err[1]);
        in[0] = out[1] = err[1] = -1;
        fcntl(out[0], F_SETFL, fcntl(out[0], F_GETFL) | O_NONBLOCK);
        fcntl(err[0], F_SETFL, fcntl(err[0], F_GETFL) | O_NONBLOCK);
        s->stdout_fd = out[0]; s->stderr_fd = err[0]; out[0] = err[0] = -1;
        if (s->want_stdin) { s->stdin_fd = in[1]; in[1] = -1; }
    }
cleanup:
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0) close(in[i]);
        if (out[i] >= 0) close(out[i]);
        if (err[i] >= 0) close(err[i]);
        if (report[i] >= 0) close(report[i]);
        if (handoff[i] >= 0) close(handoff[i]);
    }
    for (int i = 0; i < 4; i++) if (joined[i] >= 0) close(joined[i]);
    if (master >= 0) close(master);
    if (null_fd >= 0) close(null_fd);
    if (own_pid_ns >= 0) close(own_pid_ns);
    return s->pid > 0 ? 0 : -1;
#undef FAIL
}

int agent_vsock_accept(uint32_t port) {
    int listener = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0) return -1;
    struct sockaddr_vm address = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
    if (bind(listener, (struct sockaddr *)&address, sizeof address) || listen(listener, 1)) { close(listener); return -1; }
    int connection = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    close(listener);
    return connection;
}

int agent_child_signals(void) {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    return signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
}

void agent_drain_signals(int fd) {
    struct signalfd_siginfo info;
    while (read(fd, &info, sizeof info) > 0) {}
}

void agent_loopback_up(void) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return;
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strcpy(request.ifr_name, "lo");
    if (ioctl(sock, SIOCGIFFLAGS, &request) == 0) {
        request.ifr_flags |= IFF_UP;
        ioctl(sock, SIOCSIFFLAGS, &request);
    }
    close(sock);
}

int agent_resize(int pty, uint16_t width, uint16_t height) {
    struct winsize size = {.ws_row = height, .ws_col = width};
    return ioctl(pty, TIOCSWINSZ, &size);
}

/* Swift's runtime finds its own path through /proc/self/exe as it starts, and aborts without
 * it; as PID 1 of the sandbox VM nothing is mounted yet. This runs before the runtime does. */
__attribute__((constructor(101))) static void agent_mount_proc_first(void) {
    if (getpid() != 1) return;
    mkdir("/proc", 0555);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

int agent_find_ext4(const uint8_t uuid[16], char *path, size_t size) {
    DIR *block = opendir("/sys/block");
    if (!block) return -1;
    struct dirent *entry;
    int found = -1;
    while (found != 0 && (entry = readdir(block)) != NULL) {
        if (strncmp(entry->d_name, "vd", 2) != 0) continue;
        char device[64];
        snprintf(device, sizeof device, "/dev/%s", entry->d_name);
        int fd = open(device, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ioctl(fd, BLKFLSBUF, 0);
        /* The superblock is at byte 1024: magic 0xEF53 at 0x38, the UUID at 0x68. */
        uint8_t superblock[0x78];
        if (pread(fd, superblock, sizeof superblock, 1024) == (ssize_t)sizeof superblock
            && superblock[0x38] == 0x53 && superblock[0x39] == 0xef && memcmp(superblock + 0x68, uuid, 16) == 0) {
            snprintf(path, size, "%s", device);
            found = 0;
        }
        close(fd);
    }
    closedir(block);
    if (found != 0) errno = ENOENT;
    return found;
}

/* One rtnetlink request with its attributes; 0 on the kernel's ack, else -1 with errno. */
static int netlink_request(struct nlmsghdr *request) {
    int sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (sock < 0) return -1;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    int result = -1;
    if (sendto(sock, request, request->nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) == (ssize_t)request->nlmsg_len) {
        char reply[4096];
        ssize_t got = recv(sock, reply, sizeof reply, 0);
        struct nlmsghdr *header = (struct nlmsghdr *)reply;
        if (got >= (ssize_t)sizeof *header && NLMSG_OK(header, (size_t)got) && header->nlmsg_type == NLMSG_ERROR
            && header->nlmsg_len >= NLMSG_LENGTH(sizeof(struct nlmsgerr))) {
            int error = ((struct nlmsgerr *)NLMSG_DATA(header))->error;
            if (error == 0) result = 0; else errno = -error;
        } else if (got >= 0) {
            errno = EPROTO;
        }
    }
    int saved = errno;
    close(sock);
    errno = saved;
    return result;
}

/* A fresh request of `type` that creates or replaces, its fixed part zeroed and returned. */
static void *netlink_begin(struct nlmsghdr *header, size_t buffer_size, unsigned short type, size_t payload) {
    memset(header, 0, buffer_size);
    header->nlmsg_len = NLMSG_LENGTH(payload);
    header->nlmsg_type = type;
    header->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    return NLMSG_DATA(header);
}

static void add_attribute(struct nlmsghdr *header, unsigned short type, const void *data, size_t length) {
    struct rtattr *attribute = (struct rtattr *)((char *)header + NLMSG_ALIGN(header->nlmsg_len));
    attribute->rta_type = type;
    attribute->rta_len = RTA_LENGTH(length);
    memcpy(RTA_DATA(attribute), data, length);
    header->nlmsg_len = NLMSG_ALIGN(header->nlmsg_len) + RTA_ALIGN(attribute->rta_len);
}

int agent_configure_ipv6(const char *interface, const char *address, int prefix, const char *gateway, int *failed_step) {
    struct in6_addr local, via;
    *failed_step = 0;
    if (prefix < 1 || prefix > 128 || inet_pton(AF_INET6, address, &local) != 1 || (gateway && inet_pton(AF_INET6, gateway, &via) != 1)) {
        errno = EINVAL;
        return -1;
    }
    /* The card appears as the kernel probes virtio; with no IPv4 the kernel's ip= did not wait for it. */
    unsigned index = 0;
    for (int tries = 0; tries < 100 && (index = if_nametoindex(interface)) == 0; tries++) usleep(20000);
    if (index == 0) { *failed_step = 1; return -1; }
    int sock = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock >= 0) {
        struct ifreq request;
        memset(&request, 0, sizeof request);
        snprintf(request.ifr_name, sizeof request.ifr_name, "%s", interface);
        if (ioctl(sock, SIOCGIFFLAGS, &request) == 0 && !(request.ifr_flags & IFF_UP)) {
            request.ifr_flags |= IFF_UP;
            ioctl(sock, SIOCSIFFLAGS, &request);
        }
        close(sock);
    }
    union { struct nlmsghdr header; char space[512]; } message;
    /* The address, without duplicate detection: the plugin assigned it, and it is usable at once. */
    struct ifaddrmsg *addressMessage = netlink_begin(&message.header, sizeof message, RTM_NEWADDR, sizeof(struct ifaddrmsg));
    addressMessage->ifa_family = AF_INET6;
    addressMessage->ifa_prefixlen = (unsigned char)prefix;
    addressMessage->ifa_flags = IFA_F_NODAD;
    addressMessage->ifa_scope = RT_SCOPE_UNIVERSE;
    addressMessage->ifa_index = index;
    add_attribute(&message.header, IFA_LOCAL, &local, sizeof local);
    add_attribute(&message.header, IFA_ADDRESS, &local, sizeof local);
    if (netlink_request(&message.header)) { *failed_step = 2; return -1; }
    if (!gateway) return 0;
    struct rtmsg *route = netlink_begin(&message.header, sizeof message, RTM_NEWROUTE, sizeof(struct rtmsg));
    route->rtm_family = AF_INET6;
    route->rtm_dst_len = 0;
    route->rtm_table = RT_TABLE_MAIN;
    route->rtm_protocol = RTPROT_BOOT;
    route->rtm_scope = RT_SCOPE_UNIVERSE;
    route->rtm_type = RTN_UNICAST;
    add_attribute(&message.header, RTA_GATEWAY, &via, sizeof via);
    uint32_t outgoing = index;
    add_attribute(&message.header, RTA_OIF, &outgoing, sizeof outgoing);
    if (netlink_request(&message.header)) { *failed_step = 3; return -1; }
    return 0;
}
