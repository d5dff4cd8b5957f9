// iSCSI through libiscsi (what QEMU's iscsi driver uses), loaded with dlopen only when a VM has
// an iSCSI disk: libiscsi pulls in libibverbs, librdmacm and libnl, which every other VMM start
// would otherwise map and relocate (docs/disk-images.md, "iSCSI").
//
// One path is one libiscsi context with one session. Its TCP connection is made before the VMM
// is confined (vireo_iscsi_connect) and logged in afterwards (vireo_iscsi_login), so the target's
// first bytes are read by a confined process, as an NBD server's are. libiscsi's own reconnection
// is turned off: it would make a new socket, which a jailed VMM (no network, socket(2) for
// AF_UNIX only) cannot; a failed path is the caller's to fail over from.
#define _GNU_SOURCE
#include "cdiskhost.h"
#include "loading.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define SYMBOLS(X) \
    X(iscsi_create_context) X(iscsi_destroy_context) X(iscsi_set_targetname) X(iscsi_set_session_type) \
    X(iscsi_set_header_digest) X(iscsi_set_initiator_username_pwd) X(iscsi_set_noautoreconnect) \
    X(iscsi_set_timeout) X(iscsi_connect_sync) X(iscsi_login_sync) X(iscsi_logout_sync) X(iscsi_get_error) \
    X(iscsi_testunitready_sync) X(iscsi_readcapacity16_sync) X(iscsi_read16_iov_sync) X(iscsi_write16_iov_sync) \
    X(iscsi_synchronizecache16_sync) X(iscsi_unmap_sync) X(iscsi_reportluns_sync) X(scsi_datain_unmarshall) X(scsi_free_scsi_task) \
    X(scsi_sense_key_str) X(scsi_sense_ascq_str)

static struct {
#define FIELD(name) __typeof__(name) *name;
    SYMBOLS(FIELD)
#undef FIELD
} lib;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[256];

static void load(void) {
    VIREO_LOAD_LIBRARY("libiscsi.so.7", "libiscsi7", SYMBOLS)
}


int vireo_iscsi_load(char *error, size_t size) {
    pthread_once(&load_once, load);
    if (load_error[0]) { vireo_say(error, size, "%s", load_error); return -1; }
    return 0;
}

// A jailed VMM has no network of its own, and its seccomp filters allow socket(2) for AF_UNIX
// alone, yet libiscsi makes a new TCP socket for every connection. Sockets belong to the network
// namespace they were made in, so each path keeps one made before the jail (its "template"), and
// while a path reconnects this thread's socket(2) hands libiscsi a duplicate of it, the old
// connection on it dissolved first (connect to AF_UNSPEC), instead of making one. The executable
// exports this definition, so libiscsi, loaded later, binds to it; every other call passes
// straight to the system call.
static __thread int adopted_template = -1;

void vireo_iscsi_adopt_socket(int template) { adopted_template = template; }

int socket(int domain, int type, int protocol) {
    int template = adopted_template;
    if (template >= 0 && (domain == AF_INET || domain == AF_INET6)) {
        adopted_template = -1;
        struct sockaddr unspecified = { .sa_family = AF_UNSPEC };
        (void)connect(template, &unspecified, sizeof unspecified);
        int flags = fcntl(template, F_GETFL);
        if (flags >= 0) (void)fcntl(template, F_SETFL, (type & SOCK_NONBLOCK) ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
        return fcntl(template, F_DUPFD_CLOEXEC, 0);
    }
    return (int)syscall(SYS_socket, domain, type, protocol);
}

void *vireo_iscsi_connect(const char *initiator, const char *target, const char *portal, const char *user,
                          const char *password, int timeout, char *error, size_t size) {
    if (vireo_iscsi_load(error, size) != 0) return NULL;
    struct iscsi_context *iscsi = lib.iscsi_create_context(initiator);
    if (!iscsi) { vireo_say(error, size, "cannot make an iSCSI context"); return NULL; }
    if (lib.iscsi_set_targetname(iscsi, target) != 0 || lib.iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL) != 0
        || lib.iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C) != 0
        || (user && lib.iscsi_set_initiator_username_pwd(iscsi, user, password) != 0)) {
        vireo_say(error, size, "%s", lib.iscsi_get_error(iscsi));
        lib.iscsi_destroy_context(iscsi);
        return NULL;
    }
    lib.iscsi_set_noautoreconnect(iscsi, 1);
    lib.iscsi_set_timeout(iscsi, timeout);
    if (lib.iscsi_connect_sync(iscsi, portal) != 0) {
        // libiscsi's own text here speaks of its reconnection machinery, not of the cause.
        vireo_say(error, size, "cannot connect to %s: refused, or no answer within %d s", portal, timeout);
        lib.iscsi_destroy_context(iscsi);
        return NULL;
    }
    return iscsi;
}

// What a finished task means: 0 good, 1 the connection failed (fail over), 2 the target refused
// the command (the guest's I/O error), 3 a unit attention (the caller asks again).
static int outcome(struct iscsi_context *iscsi, struct scsi_task *task, const char *what, char *error, size_t size) {
    if (!task) { vireo_say(error, size, "%s: %s", what, lib.iscsi_get_error(iscsi)); return 1; }
    int status = task->status;
    if (status == SCSI_STATUS_GOOD) return 0;
    if (status == SCSI_STATUS_CHECK_CONDITION) {
        int key = task->sense.key, ascq = task->sense.ascq;
        vireo_say(error, size, "%s: %s (%s)", what, lib.scsi_sense_key_str(key), lib.scsi_sense_ascq_str(ascq));
        return key == SCSI_SENSE_UNIT_ATTENTION ? 3 : 2;
    }
    if (status == SCSI_STATUS_BUSY || status == SCSI_STATUS_TASK_SET_FULL) {
        vireo_say(error, size, "%s: the target is busy", what);
        return 3;
    }
    if (status == SCSI_STATUS_CANCELLED || status == SCSI_STATUS_ERROR || status == SCSI_STATUS_TIMEOUT) {
        vireo_say(error, size, "%s: %s", what, lib.iscsi_get_error(iscsi));
        return 1;
    }
    vireo_say(error, size, "%s: SCSI status 0x%x", what, status);
    return 2;
}

// Runs one command, asking again after a unit attention (a target reports one after a reset or
// a change, and the command itself was not run) up to a few times.
#define WITH_RETRIES(what, call, on_good) \
    for (int attempt = 0;; attempt++) { \
        struct scsi_task *task = (call); \
        int result = outcome(iscsi, task, what, error, size); \
        if (result == 0) { on_good; } \
        if (task) lib.scsi_free_scsi_task(task); \
        if (result != 3 || attempt >= 4) return result == 3 ? 2 : result; \
    }

int vireo_iscsi_login(void *path, int lun, unsigned long long *blocks, unsigned int *block_size, int *thin,
                      char *error, size_t size) {
    struct iscsi_context *iscsi = path;
    if (lib.iscsi_login_sync(iscsi) != 0) {
        const char *why = lib.iscsi_get_error(iscsi);
        vireo_say(error, size, "login refused: %s%s", why,
            strstr(why, "Authentication") ? " (check the USER:SECRET in the disk's ?chap=FILE)" : "");
        return 2;
    }
    // The first command after login commonly meets the target's "power on or reset" attention.
    int ready = 3;
    for (int attempt = 0; attempt < 5 && ready == 3; attempt++) {
        struct scsi_task *task = lib.iscsi_testunitready_sync(iscsi, lun);
        ready = outcome(iscsi, task, "TEST UNIT READY", error, size);
        if (task) lib.scsi_free_scsi_task(task);
    }
    if (ready != 0) return ready == 3 ? 2 : ready;
    WITH_RETRIES("READ CAPACITY(16)", lib.iscsi_readcapacity16_sync(iscsi, lun), {
        struct scsi_readcapacity16 *capacity = lib.scsi_datain_unmarshall(task);
        if (!capacity) {
            vireo_say(error, size, "READ CAPACITY(16): the target's answer is malformed");
            lib.scsi_free_scsi_task(task);
            return 2;
        }
        *blocks = capacity->returned_lba + 1;
        *block_size = capacity->block_length;
        *thin = capacity->lbpme;
        lib.scsi_free_scsi_task(task);
        return 0;
    })
}

int vireo_iscsi_transfer(void *path, int lun, int write, unsigned long long lba, unsigned int length, unsigned int block_size,
                         void *buffer, char *error, size_t size) {
    struct iscsi_context *iscsi = path;
    struct scsi_iovec vector = { buffer, length };
    if (write) {
        WITH_RETRIES("WRITE(16)", lib.iscsi_write16_iov_sync(iscsi, lun, lba, NULL, length, (int)block_size, 0, 0, 0, 0, 0, &vector, 1),
                     { lib.scsi_free_scsi_task(task); return 0; })
    }
    WITH_RETRIES("READ(16)", lib.iscsi_read16_iov_sync(iscsi, lun, lba, length, (int)block_size, 0, 0, 0, 0, 0, &vector, 1),
                 { lib.scsi_free_scsi_task(task); return 0; })
}

int vireo_iscsi_flush(void *path, int lun, char *error, size_t size) {
    struct iscsi_context *iscsi = path;
    WITH_RETRIES("SYNCHRONIZE CACHE(16)", lib.iscsi_synchronizecache16_sync(iscsi, lun, 0, 0, 0, 0),
                 { lib.scsi_free_scsi_task(task); return 0; })
}

int vireo_iscsi_unmap(void *path, int lun, unsigned long long lba, unsigned int blocks, char *error, size_t size) {
    struct iscsi_context *iscsi = path;
    struct unmap_list range = { lba, blocks };
    WITH_RETRIES("UNMAP", lib.iscsi_unmap_sync(iscsi, lun, 0, 0, &range, 1), { lib.scsi_free_scsi_task(task); return 0; })
}

int vireo_iscsi_list_luns(void *path, int *luns, unsigned long long *sizes, int max, char *error, size_t size) {
    struct iscsi_context *iscsi = path;
    if (lib.iscsi_login_sync(iscsi) != 0) {
        const char *why = lib.iscsi_get_error(iscsi);
        vireo_say(error, size, "login refused: %s%s", why, strstr(why, "Authentication") ? " (check the USER:SECRET in the pool's CHAP file)" : "");
        return -1;
    }
    // REPORT LUNS is answered by LUN 0, which every target has (SPC-4); the list is the target's
    // bytes, read by libiscsi and bounded here.
    int count = -1;
    for (int attempt = 0; attempt < 5 && count < 0; attempt++) {
        struct scsi_task *task = lib.iscsi_reportluns_sync(iscsi, 0, 16384);
        int result = outcome(iscsi, task, "REPORT LUNS", error, size);
        if (result == 0) {
            struct scsi_reportluns_list *list = lib.scsi_datain_unmarshall(task);
            if (!list) {
                vireo_say(error, size, "REPORT LUNS: the target's answer is malformed");
                lib.scsi_free_scsi_task(task);
                return -1;
            }
            count = 0;
            for (uint32_t index = 0; index < list->num && count < max; index++) luns[count++] = list->luns[index];
        }
        if (task) lib.scsi_free_scsi_task(task);
        if (result != 0 && result != 3) return -1;
    }
    if (count < 0) return -1;
    // Each LUN's size; 0 for one that is not a disk (a target's controller LUN has no capacity).
    for (int index = 0; index < count; index++) {
        sizes[index] = 0;
        for (int attempt = 0; attempt < 5; attempt++) {
            struct scsi_task *task = lib.iscsi_readcapacity16_sync(iscsi, luns[index]);
            int result = outcome(iscsi, task, "READ CAPACITY(16)", error, size);
            if (result == 0) {
                struct scsi_readcapacity16 *capacity = lib.scsi_datain_unmarshall(task);
                unsigned long long blocks = capacity ? capacity->returned_lba + 1 : 0;
                if (capacity && blocks <= (~0ULL) / capacity->block_length) sizes[index] = blocks * capacity->block_length;
            }
            if (task) lib.scsi_free_scsi_task(task);
            if (result != 3) break;
        }
    }
    error[0] = 0;
    return count;
}

void vireo_iscsi_close(void *path, int logout) {
    struct iscsi_context *iscsi = path;
    if (!iscsi) return;
    if (logout) lib.iscsi_logout_sync(iscsi);
    lib.iscsi_destroy_context(iscsi);
}
