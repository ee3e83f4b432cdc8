/* The slice of Android's libc (bionic) stdio that edgellm's engine uses, declared for the offline APK
 * build, which has clang but no NDK sysroot. These are the C standard's signatures, which bionic
 * exports unversioned-compatible from libc.so since API 21. Not used by Gradle/NDK or host builds. */
#ifndef EDGELLM_SHIM_STDIO_H
#define EDGELLM_SHIM_STDIO_H
#include <stdarg.h>
#include <stddef.h>
typedef struct __sFILE FILE;
#define SEEK_SET 0
#define SEEK_CUR 1
#define SEEK_END 2
FILE *fopen(const char *path, const char *mode);
size_t fread(void *buf, size_t size, size_t n, FILE *f);
int fseek(FILE *f, long offset, int whence);
long ftell(FILE *f);
int fclose(FILE *f);
int snprintf(char *buf, size_t n, const char *fmt, ...);
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
#endif
