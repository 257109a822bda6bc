/* The threads of phi3's kernels: OpenMP where the compiler takes -fopenmp, else POSIX threads
 * (Apple's clang refuses -fopenmp; kernels.py then builds with -pthread).
 *
 * `phi3_parallel` runs `body` on every thread of a team; inside it `phi3_share` gives the calling
 * thread its static share of a loop of n iterations (what `omp for schedule(static)` gave it) and
 * `phi3_barrier` waits for the whole team (the barrier an `omp for` ends with). Called outside a
 * parallel region, a thread is a team of one: its share is the whole loop and barriers return. */
#ifndef PHI3_PARALLEL_H
#define PHI3_PARALLEL_H
#include <stdint.h>

typedef struct {
    int64_t begin, end;
} phi3_range;

void phi3_parallel(int threads, void (*body)(void *), void *arg);
int phi3_thread(void); /* 0 .. phi3_team() - 1 */
int phi3_team(void);
void phi3_barrier(void);
int phi3_threads_kind(void);       /* 1: OpenMP, 2: POSIX threads */
int phi3_threads_seen(int threads); /* tests: the threads a region of `threads` really ran on */

/* iterations begin..end-1 of 0..n-1: the first n % team threads take one more (OpenMP's static split) */
static inline phi3_range phi3_share(int64_t n) {
    const int64_t t = phi3_thread(), team = phi3_team(), q = n / team, r = n % team;
    const int64_t begin = t * q + (t < r ? t : r);
    phi3_range range = {begin, begin + q + (t < r)};
    return range;
}

#endif
