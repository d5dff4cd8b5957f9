// Hands control to libFuzzer when it is linked in (builds with -sanitize=fuzzer); SwiftPM gives
// every executable its own entry point, so libFuzzer's own main cannot be used.
#ifndef VIREO_CFUZZDRIVER_H
#define VIREO_CFUZZDRIVER_H
#include <stddef.h>
#include <stdint.h>

// Returns libFuzzer's exit status, or -1 when this binary was built without libFuzzer.
int vireo_run_fuzzer(int argc, char **argv, int (*test_one_input)(const uint8_t *data, size_t size));
#endif
