#define _GNU_SOURCE
#include "cdiskhost.h"
#include <errno.h>
#include <fcntl.h>

int vireo_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0 ? 0 : errno;
}
