#define _GNU_SOURCE
#include "cdiskhost.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>

int vireo_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0 ? 0 : errno;
}

// On a block device fallocate is the block layer's zeroing (blkdev_fallocate): PUNCH_HOLE|
// KEEP_SIZE is BLKZEROOUT that must unmap (zeros guaranteed, nothing written), ZERO_RANGE is
// BLKZEROOUT that may write zeros: the same kernel calls as the ioctl, through a system call
// every VMM thread may already make.
int vireo_device_zero(int fd, long long offset, long long length) {
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0) return 0;
    if (errno != EOPNOTSUPP && errno != EINVAL) return errno;
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) == 0 ? 0 : errno;
}

// A discard has no fallocate form any more (FALLOC_FL_NO_HIDE_STALE is gone from newer
// kernels): BLKDISCARD, which the device threads' seccomp filter allows by its exact number.
int vireo_device_discard(int fd, long long offset, long long length) {
    unsigned long long range[2] = { (unsigned long long)offset, (unsigned long long)length };
    return ioctl(fd, BLKDISCARD, range) == 0 ? 0 : errno;
}

int vireo_device_geometry(int fd, unsigned long long *size, unsigned int *logical_block_size) {
    unsigned long long bytes = 0;
    int logical = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) return errno;
    if (ioctl(fd, BLKSSZGET, &logical) != 0) return errno;
    *size = bytes;
    *logical_block_size = logical > 0 ? (unsigned int)logical : 512;
    return 0;
}

int vireo_open_direct_flag(void) { return O_DIRECT; }
