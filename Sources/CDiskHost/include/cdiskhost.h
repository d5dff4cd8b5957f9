// Host file operations that Swift's Glibc module does not export (they need _GNU_SOURCE).
#ifndef VIREO_CDISKHOST_H
#define VIREO_CDISKHOST_H

// Deallocates [offset, offset+length) of a file, keeping its size; reads there return zeros.
// Returns 0 or an errno value.
int vireo_punch_hole(int fd, long long offset, long long length);

// A block device's range made to read as zeros: unmapped where the device guarantees zeros
// after it, else written. Returns 0 or an errno value.
int vireo_device_zero(int fd, long long offset, long long length);

// A block device's range discarded (BLKDISCARD): its contents are then whatever the device
// keeps. Returns 0 or an errno value (EOPNOTSUPP: the device cannot discard).
int vireo_device_discard(int fd, long long offset, long long length);

// A block device's size in bytes and logical block size (BLKGETSIZE64, BLKSSZGET). Returns 0 or
// an errno value.
int vireo_device_geometry(int fd, unsigned long long *size, unsigned int *logical_block_size);

// O_DIRECT, which Swift's Glibc does not export.
int vireo_open_direct_flag(void);

// iSCSI through libiscsi, loaded on first use (iscsi.c). A path is an opaque libiscsi context.
// Each call fills `error` on failure. Results of the I/O calls: 0 done, 1 the connection failed
// (another path may take over), 2 the target refused (an I/O error for the guest).
#include <stddef.h>
int vireo_iscsi_load(char *error, size_t size);
// The next TCP socket this thread makes (libiscsi's, while it connects) is a duplicate of
// `template`, a socket made before the VMM was confined; -1 disarms (iscsi.c).
void vireo_iscsi_adopt_socket(int template);
// A TCP connection to `portal` (HOST[:PORT]) for `target`, not yet logged in; NULL on failure.
void *vireo_iscsi_connect(const char *initiator, const char *target, const char *portal, const char *user,
                          const char *password, int timeout, char *error, size_t size);
// Logs in and reads the LUN's size, block size and whether it is thin-provisioned (UNMAP works).
int vireo_iscsi_login(void *path, int lun, unsigned long long *blocks, unsigned int *block_size, int *thin,
                      char *error, size_t size);
int vireo_iscsi_transfer(void *path, int lun, int write, unsigned long long lba, unsigned int length, unsigned int block_size,
                         void *buffer, char *error, size_t size);
int vireo_iscsi_flush(void *path, int lun, char *error, size_t size);
int vireo_iscsi_unmap(void *path, int lun, unsigned long long lba, unsigned int blocks, char *error, size_t size);
// Logs in (a path connected for no LUN in particular) and lists the target's LUNs (REPORT LUNS,
// at most `max`) with each one's size in bytes, 0 for a LUN that is not a disk; -1 on failure.
int vireo_iscsi_list_luns(void *path, int *luns, unsigned long long *sizes, int max, char *error, size_t size);
void vireo_iscsi_close(void *path, int logout);

// TLS client sessions through GnuTLS, loaded on first use (tls.c), for NBD disks (`nbds://`).
// Credentials: the CA certificates from `ca_file` (NULL: the system's trust store) and, when both
// are given, a client certificate and key; NULL on failure, with `error` filled.
void *vireo_tls_credentials(const char *ca_file, const char *cert_file, const char *key_file, char *error, size_t size);
void vireo_tls_credentials_free(void *credentials);
// A client session over the connected socket `fd`, its handshake done and the server's
// certificate checked (against `hostname` too unless NULL; sent as SNI if `send_server_name`).
void *vireo_tls_session(void *credentials, int fd, const char *hostname, int send_server_name, char *error, size_t size);
// Bytes moved (> 0), 0 when the server closed the connection, -1 on failure (`error` filled).
long vireo_tls_send(void *session, const void *data, size_t length, char *error, size_t size);
long vireo_tls_recv(void *session, void *data, size_t length, char *error, size_t size);
// Bytes of a received record not yet read: a read of at most that many needs no system call.
size_t vireo_tls_pending(void *session);
// Ends the session (`notify`: sends close_notify first) and frees it; the socket stays open.
void vireo_tls_close(void *session, int notify);

#endif
