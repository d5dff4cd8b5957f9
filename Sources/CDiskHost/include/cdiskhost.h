// Host file operations that Swift's Glibc module does not export (they need _GNU_SOURCE).
#ifndef VIREO_CDISKHOST_H
#define VIREO_CDISKHOST_H

// Deallocates [offset, offset+length) of a file, keeping its size; reads there return zeros.
// Returns 0 or an errno value.
int vireo_punch_hole(int fd, long long offset, long long length);

#endif
