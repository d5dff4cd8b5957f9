#include "czlib.h"
#include <string.h>
#include <zlib.h>
#include <pthread.h>

long vireo_inflate_raw(const void *source, size_t source_length, void *destination, size_t destination_length) {
    z_stream stream;
    memset(&stream, 0, sizeof stream);
    if (inflateInit2(&stream, -12) != Z_OK) return -1;
    stream.next_in = (Bytef *)source;
    stream.avail_in = (uInt)source_length;
    stream.next_out = (Bytef *)destination;
    stream.avail_out = (uInt)destination_length;
    int result = inflate(&stream, Z_FINISH);
    long produced = (long)(destination_length - stream.avail_out);
    inflateEnd(&stream);
    // A compressed cluster's sectors may carry bytes past the stream's end, and the stream may
    // stop exactly when the cluster is full: both are fine. Anything else is corruption.
    if (result != Z_STREAM_END && result != Z_OK && result != Z_BUF_ERROR) return -1;
    return produced;
}

unsigned long vireo_crc32(unsigned long crc, const void *data, size_t length) {
    // zlib takes 32-bit lengths; feed large buffers (guest RAM) in slices.
    const unsigned char *bytes = data;
    while (length > 0) {
        uInt slice = length > (1u << 30) ? (1u << 30) : (uInt)length;
        crc = crc32(crc, bytes, slice);
        bytes += slice;
        length -= slice;
    }
    return crc;
}

static const unsigned char zeros[65536];
static unsigned long chunk_crc;
static pthread_once_t chunk_crc_once = PTHREAD_ONCE_INIT;
static void compute_chunk_crc(void) { chunk_crc = crc32(0, zeros, sizeof zeros); }

unsigned long vireo_crc32_zeros(unsigned long crc, unsigned long long length) {
    pthread_once(&chunk_crc_once, compute_chunk_crc);
    while (length >= sizeof zeros) {
        crc = crc32_combine(crc, chunk_crc, (z_off_t)sizeof zeros);
        length -= sizeof zeros;
    }
    return length ? crc32(crc, zeros, (uInt)length) : crc;
}

int vireo_is_zero(const void *data, size_t length) {
    const unsigned char *bytes = data;
    size_t index = 0;
    for (; index + 8 <= length; index += 8) {
        unsigned long long word;
        memcpy(&word, bytes + index, 8);
        if (word) return 0;
    }
    for (; index < length; index++) if (bytes[index]) return 0;
    return 1;
}
