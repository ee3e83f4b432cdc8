/* See stdio.h: the bionic memory functions the engine uses, for the NDK-less APK build. */
#ifndef EDGELLM_SHIM_STDLIB_H
#define EDGELLM_SHIM_STDLIB_H
#include <stddef.h>
void *malloc(size_t n);
void *calloc(size_t n, size_t size);
void *realloc(void *p, size_t n);
void free(void *p);
#endif
