#include "ccrypt.h"

#include <crypt.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

int vireo_hash_password(const char *password, char *out, size_t capacity) {
    char salt[CRYPT_GENSALT_OUTPUT_SIZE];
    if (crypt_gensalt_rn("$y$", 0, NULL, 0, salt, sizeof salt) == NULL) return errno ? errno : EINVAL;
    struct crypt_data *data = calloc(1, sizeof *data);
    if (data == NULL) return ENOMEM;
    const char *hash = crypt_r(password, salt, data);
    int result = 0;
    if (hash == NULL || hash[0] == '*') result = errno ? errno : EINVAL;
    else if (strlen(hash) >= capacity) result = ERANGE;
    else strcpy(out, hash);
    explicit_bzero(data, sizeof *data);
    free(data);
    return result;
}
