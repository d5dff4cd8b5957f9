// TLS for NBD disks (`nbds://`) through GnuTLS, what QEMU's NBD client and qemu-nbd use. Loaded
// with dlopen only when a VM has such a disk: GnuTLS pulls in nettle, gmp, p11-kit, libidn2 and
// more, which every other VMM start would otherwise map and relocate (docs/disk-images.md).
//
// Credentials (the CA certificates, a client certificate and key) are read from their files before
// the VMM is confined; the handshake, like every byte a server sends, happens once it is
// (vireo_tls_session), and again from inside the jail when a path reconnects, on the same
// credentials. The server's certificate must chain to the credentials' CAs and, when a host name
// is given, name it.
#define _GNU_SOURCE
#include "cdiskhost.h"
#include "loading.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <gnutls/gnutls.h>

#undef gnutls_transport_set_int
#undef gnutls_free

#define SYMBOLS(X) \
    X(gnutls_global_init) X(gnutls_strerror) X(gnutls_certificate_allocate_credentials) \
    X(gnutls_certificate_free_credentials) X(gnutls_certificate_set_x509_trust_file) \
    X(gnutls_certificate_set_x509_system_trust) X(gnutls_certificate_set_x509_key_file) X(gnutls_init) \
    X(gnutls_deinit) X(gnutls_set_default_priority) X(gnutls_credentials_set) X(gnutls_server_name_set) \
    X(gnutls_session_set_verify_cert) X(gnutls_transport_set_int2) X(gnutls_handshake) X(gnutls_bye) \
    X(gnutls_record_send) X(gnutls_record_recv) X(gnutls_session_get_verify_cert_status) \
    X(gnutls_certificate_type_get) X(gnutls_certificate_verification_status_print) X(gnutls_alert_get) \
    X(gnutls_alert_get_name) X(gnutls_record_check_pending)

static struct {
#define FIELD(name) __typeof__(name) *name;
    SYMBOLS(FIELD)
#undef FIELD
    gnutls_free_function *free;
} lib;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[256];

static void load(void) {
    VIREO_LOAD_LIBRARY("libgnutls.so.30", "libgnutls30", SYMBOLS)
    if (!(lib.free = (gnutls_free_function *)dlsym(handle, "gnutls_free"))) {
        snprintf(load_error, sizeof load_error, "%s lacks gnutls_free", library);
        return;
    }
    int result = lib.gnutls_global_init();
    if (result < 0) snprintf(load_error, sizeof load_error, "GnuTLS did not start: %s", lib.gnutls_strerror(result));
}


void *vireo_tls_credentials(const char *ca_file, const char *cert_file, const char *key_file, char *error, size_t size) {
    pthread_once(&load_once, load);
    if (load_error[0]) { vireo_say(error, size, "%s", load_error); return NULL; }
    gnutls_certificate_credentials_t credentials;
    int result = lib.gnutls_certificate_allocate_credentials(&credentials);
    if (result < 0) { vireo_say(error, size, "cannot make TLS credentials: %s", lib.gnutls_strerror(result)); return NULL; }
    // The number of certificates read; none is as much an error as a failure.
    result = ca_file ? lib.gnutls_certificate_set_x509_trust_file(credentials, ca_file, GNUTLS_X509_FMT_PEM)
                     : lib.gnutls_certificate_set_x509_system_trust(credentials);
    if (result <= 0) {
        if (ca_file) vireo_say(error, size, "no CA certificate read from %s: %s", ca_file, result < 0 ? lib.gnutls_strerror(result) : "the file holds none");
        else vireo_say(error, size, "no CA certificate in the system's trust store: %s", result < 0 ? lib.gnutls_strerror(result) : "it is empty");
        lib.gnutls_certificate_free_credentials(credentials);
        return NULL;
    }
    if (cert_file && key_file) {
        result = lib.gnutls_certificate_set_x509_key_file(credentials, cert_file, key_file, GNUTLS_X509_FMT_PEM);
        if (result < 0) {
            vireo_say(error, size, "cannot use the client certificate %s with the key %s: %s", cert_file, key_file, lib.gnutls_strerror(result));
            lib.gnutls_certificate_free_credentials(credentials);
            return NULL;
        }
    }
    return credentials;
}

void vireo_tls_credentials_free(void *credentials) {
    if (credentials) lib.gnutls_certificate_free_credentials((gnutls_certificate_credentials_t)credentials);
}

// Why a handshake failed, in words: the certificate check's verdict, the server's alert, or
// GnuTLS's own message.
static void explain(gnutls_session_t session, int result, char *error, size_t size) {
    if (result == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
        unsigned int status = lib.gnutls_session_get_verify_cert_status(session);
        gnutls_datum_t text = { NULL, 0 };
        if (lib.gnutls_certificate_verification_status_print(status, lib.gnutls_certificate_type_get(session), &text, 0) == 0 && text.data) {
            vireo_say(error, size, "the server's certificate was refused: %s", (const char *)text.data);
            (*lib.free)(text.data);
            // GnuTLS ends its sentences with a space.
            size_t length = strlen(error);
            while (length > 0 && error[length - 1] == ' ') error[--length] = 0;
            return;
        }
        vireo_say(error, size, "the server's certificate was refused (status 0x%x)", status);
        return;
    }
    if (result == GNUTLS_E_FATAL_ALERT_RECEIVED) {
        const char *alert = lib.gnutls_alert_get_name(lib.gnutls_alert_get(session));
        vireo_say(error, size, "the server ended the TLS handshake: %s", alert ? alert : "an unknown alert");
        return;
    }
    if (result == GNUTLS_E_AGAIN) { vireo_say(error, size, "the TLS handshake timed out"); return; }
    vireo_say(error, size, "the TLS handshake failed: %s", lib.gnutls_strerror(result));
}

void *vireo_tls_session(void *credentials, int fd, const char *hostname, int send_server_name, char *error, size_t size) {
    if (!credentials) { vireo_say(error, size, "no TLS credentials"); return NULL; }
    gnutls_session_t session;
    int result = lib.gnutls_init(&session, GNUTLS_CLIENT | GNUTLS_NO_SIGNAL);
    if (result < 0) { vireo_say(error, size, "cannot make a TLS session: %s", lib.gnutls_strerror(result)); return NULL; }
    if ((result = lib.gnutls_set_default_priority(session)) < 0
        || (result = lib.gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, credentials)) < 0
        || (hostname && send_server_name && (result = lib.gnutls_server_name_set(session, GNUTLS_NAME_DNS, hostname, strlen(hostname))) < 0)) {
        vireo_say(error, size, "cannot set up the TLS session: %s", lib.gnutls_strerror(result));
        lib.gnutls_deinit(session);
        return NULL;
    }
    // NULL: the chain is checked, no name (a Unix socket's server has none to match).
    lib.gnutls_session_set_verify_cert(session, hostname, 0);
    lib.gnutls_transport_set_int2(session, fd, fd);
    // The socket's own timeouts bound each read and write: a server that stalls gives
    // GNUTLS_E_AGAIN, which ends the attempt rather than spinning.
    do { result = lib.gnutls_handshake(session); } while (result == GNUTLS_E_INTERRUPTED);
    if (result < 0) {
        explain(session, result, error, size);
        lib.gnutls_deinit(session);
        return NULL;
    }
    return session;
}

long vireo_tls_send(void *session, const void *data, size_t length, char *error, size_t size) {
    ssize_t result;
    do { result = lib.gnutls_record_send((gnutls_session_t)session, data, length); } while (result == GNUTLS_E_INTERRUPTED);
    if (result < 0) {
        vireo_say(error, size, "TLS send: %s", result == GNUTLS_E_AGAIN ? "timed out" : lib.gnutls_strerror((int)result));
        return -1;
    }
    return (long)result;
}

long vireo_tls_recv(void *session, void *data, size_t length, char *error, size_t size) {
    ssize_t result;
    do { result = lib.gnutls_record_recv((gnutls_session_t)session, data, length); } while (result == GNUTLS_E_INTERRUPTED);
    if (result < 0) {
        // A peer that closes without close_notify is a closed connection, as for plain sockets.
        if (result == GNUTLS_E_PREMATURE_TERMINATION) return 0;
        vireo_say(error, size, "TLS receive: %s", result == GNUTLS_E_AGAIN ? "timed out" : lib.gnutls_strerror((int)result));
        return -1;
    }
    return (long)result;
}

size_t vireo_tls_pending(void *session) {
    return lib.gnutls_record_check_pending((gnutls_session_t)session);
}

void vireo_tls_close(void *session, int notify) {
    if (!session) return;
    // close_notify without waiting for the server's: best effort, as NBD_CMD_DISC before it.
    if (notify) lib.gnutls_bye((gnutls_session_t)session, GNUTLS_SHUT_WR);
    lib.gnutls_deinit((gnutls_session_t)session);
}
