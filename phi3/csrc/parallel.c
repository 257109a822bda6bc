/* parallel.h's team: OpenMP's, or one of POSIX threads started per parallel region. */
#include "parallel.h"

#include <pthread.h>
#include <stdatomic.h>

#ifdef _OPENMP
#include <omp.h>

void phi3_parallel(int threads, void (*body)(void *), void *arg) {
#pragma omp parallel num_threads(threads)
    body(arg);
}

int phi3_thread(void) { return omp_get_thread_num(); }
int phi3_team(void) { return omp_get_num_threads(); }
void phi3_barrier(void) {
#pragma omp barrier
}

int phi3_threads_kind(void) { return 1; }

#else /* POSIX threads: the caller is thread 0, threads 1.. are started for the region and joined after it */
#include <sched.h>

typedef struct {
    void (*body)(void *);
    void *arg;
    atomic_int ready;         /* the team's size is final (some thread may have failed to start) */
    int size;
    atomic_int waiting;       /* threads at the barrier */
    atomic_uint generation;   /* barriers passed */
} team_t;

static _Thread_local team_t *my_team; /* NULL outside a region: a team of one */
static _Thread_local int my_id;

typedef struct {
    team_t *team;
    int id;
} member_t;

static void *member(void *p) {
    const member_t *m = p;
    my_team = m->team, my_id = m->id;
    while (!atomic_load(&my_team->ready)) sched_yield();
    my_team->body(my_team->arg);
    my_team = NULL, my_id = 0;
    return NULL;
}

#define MAX_THREADS 256

void phi3_parallel(int threads, void (*body)(void *), void *arg) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1 || my_team) { /* one thread, or a region inside a region: run it on this thread */
        body(arg);
        return;
    }
    team_t team = {.body = body, .arg = arg};
    atomic_init(&team.ready, 0), atomic_init(&team.waiting, 0), atomic_init(&team.generation, 0);
    pthread_t ids[MAX_THREADS];
    member_t members[MAX_THREADS];
    int started = 1;
    for (int i = 1; i < threads; i++) {
        members[started] = (member_t){&team, started};
        if (pthread_create(&ids[started], NULL, member, &members[started]) == 0) started++;
    }
    team.size = started;
    atomic_store(&team.ready, 1);
    my_team = &team, my_id = 0;
    body(arg);
    my_team = NULL;
    for (int i = 1; i < started; i++) pthread_join(ids[i], NULL);
}

int phi3_thread(void) { return my_team ? my_id : 0; }
int phi3_team(void) { return my_team ? my_team->size : 1; }

/* A spinning barrier (the stages it separates last microseconds, less than a sleep and wake-up):
 * the last thread to arrive resets the count, then opens the barrier by moving `generation` on. */
void phi3_barrier(void) {
    team_t *t = my_team;
    if (!t || t->size == 1) return;
    const unsigned generation = atomic_load(&t->generation);
    if (atomic_fetch_add(&t->waiting, 1) == t->size - 1) {
        atomic_store(&t->waiting, 0);
        atomic_fetch_add(&t->generation, 1);
        return;
    }
    for (unsigned spins = 0; atomic_load(&t->generation) == generation; spins++)
        if (spins >= 2000) sched_yield(); /* more threads than free cores: let the late ones run */
}

int phi3_threads_kind(void) { return 2; }

#endif

/* For tests: run a region of `threads` threads and count the distinct threads that took part, each
 * having seen the whole team arrive at a barrier; 0 when one did not. */
#define PROBE_THREADS 64

typedef struct {
    atomic_int arrived, wrong;
    pthread_t seen[PROBE_THREADS];
} probe_t;

static void probe_body(void *p) {
    probe_t *probe = p;
    const int id = phi3_thread();
    if (id < PROBE_THREADS) probe->seen[id] = pthread_self();
    atomic_fetch_add(&probe->arrived, 1);
    phi3_barrier();
    if (atomic_load(&probe->arrived) != phi3_team()) atomic_fetch_add(&probe->wrong, 1);
}

int phi3_threads_seen(int threads) {
    probe_t probe;
    atomic_init(&probe.arrived, 0), atomic_init(&probe.wrong, 0);
    if (threads > PROBE_THREADS) threads = PROBE_THREADS;
    phi3_parallel(threads, probe_body, &probe);
    const int n = atomic_load(&probe.arrived);
    if (atomic_load(&probe.wrong) || n > threads) return 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            if (pthread_equal(probe.seen[i], probe.seen[j])) return 0;
    return n;
}
