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

#endif
