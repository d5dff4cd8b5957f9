// Password hashing for cloud-init's `passwd`, through the system's libcrypt (libxcrypt), so a VM's
// /etc/shadow gets the hash Debian itself would write.
#ifndef VIREO_CCRYPT_H
#define VIREO_CCRYPT_H

#include <stddef.h>

// Hashes `password` with yescrypt ("$y$", Debian 12's default) and a fresh random salt into
// `out` (NUL-terminated). Returns 0 or an errno value.
int vireo_hash_password(const char *password, char *out, size_t capacity);

#endif
