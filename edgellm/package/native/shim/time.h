/* See stdio.h: the bionic clock the engine times its system prompt with, for the NDK-less APK build. */
#ifndef EDGELLM_SHIM_TIME_H
#define EDGELLM_SHIM_TIME_H
typedef long time_t;
struct timespec {
    time_t tv_sec;
    long tv_nsec;
};
typedef int clockid_t;
#define CLOCK_MONOTONIC 1
int clock_gettime(clockid_t clock, struct timespec *ts);
#endif
