// The one zlib call qcow2 needs: inflating a raw deflate stream (QEMU writes compressed clusters
// with window bits -12, no zlib header).
#ifndef VIREO_CZLIB_H
#define VIREO_CZLIB_H
#include <stddef.h>

// Inflates `source` into `destination`. Returns the bytes produced, or -1 if the stream is
// malformed. Never writes past `destination_length`.
long vireo_inflate_raw(const void *source, size_t source_length, void *destination, size_t destination_length);

// Continues a CRC-32 (zlib's, the one gzip and PNG use) over `length` bytes; start with 0.
unsigned long vireo_crc32(unsigned long crc, const void *data, size_t length);

// Continues a CRC-32 over `length` zero bytes without reading any (zlib's crc32_combine): guest
// RAM the guest never touched is skipped in saved states, yet covered by their checksum.
unsigned long vireo_crc32_zeros(unsigned long crc, unsigned long long length);

// Whether `length` bytes at `data` are all zero.
int vireo_is_zero(const void *data, size_t length);

#endif
