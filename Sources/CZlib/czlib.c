#include "czlib.h"
#include <string.h>
#include <zlib.h>

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
