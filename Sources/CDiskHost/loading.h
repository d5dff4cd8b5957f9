// What the dlopen'd network-disk libraries' shims (iscsi.c, tls.c) share: loading a library's
// symbols into a struct of typed pointers, and messages into a caller's buffer.
#ifndef VIREO_CDISKHOST_LOADING_H
#define VIREO_CDISKHOST_LOADING_H

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>

// The body of a pthread_once loader: opens `soname` and resolves every name SYMBOLS lists into
// `lib.NAME`; on failure `load_error` says which library or symbol, and the Debian package.
#define VIREO_LOAD_LIBRARY(soname, package, SYMBOLS) \
    const char *library = soname; \
    void *handle = dlopen(library, RTLD_NOW | RTLD_LOCAL); \
    if (!handle) { \
        snprintf(load_error, sizeof load_error, "%s is not installed (%s); install Debian's %s package", library, dlerror(), package); \
        return; \
    } \
    SYMBOLS(VIREO_RESOLVE_SYMBOL)

#define VIREO_RESOLVE_SYMBOL(name) \
    if (!(lib.name = (__typeof__(name) *)dlsym(handle, #name))) { \
        snprintf(load_error, sizeof load_error, "%s lacks %s", library, #name); \
        return; \
    }

// printf into `error` (of `size` bytes), if there is one.
static inline void vireo_say(char *error, size_t size, const char *format, ...) {
    if (!error || size == 0) return;
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(error, size, format, arguments);
    va_end(arguments);
}

#endif
