/* parallel.h's team: OpenMP's, or POSIX threads from a pool kept for the process (as OpenMP keeps
 * its own): its workers spin a little after a region, then sleep until the next. */
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

#else /* POSIX threads: a pool started on first use, kept for the process; the caller is thread 0 */
#include <sched.h>

typedef struct {
    void (*body)(void *);
    void *arg;
    int size;               /* the team: the caller and workers 1 .. size - 1 */
    atomic_int waiting;     /* threads at the barrier */
    atomic_uint generation; /* barriers passed */
    atomic_int finished;    /* workers done with body */
} team_t;

static _Thread_local team_t *my_team; /* NULL outside a region: a team of one */
static _Thread_local int my_id;

#define MAX_THREADS 256
#define SPINS 1000 /* a worker's looks at its slot before it sleeps: few, torch's own threads want the cores */

static struct {
    pthread_mutex_t lock; /* with `wake`: sleeping workers; also guards `workers` */
    pthread_cond_t wake;
    pthread_mutex_t region;             /* one region at a time; a second caller thread runs alone */
    int workers;                        /* started: ids 1 .. workers */
    _Atomic(team_t *) task[MAX_THREADS]; /* worker i's region to run, NULL when none */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .region = PTHREAD_MUTEX_INITIALIZER};

static void *worker(void *p) {
    const int id = (int)(intptr_t)p;
    for (;;) {
        team_t *team = NULL;
        for (int spins = 0; spins < SPINS && !(team = atomic_load(&pool.task[id])); spins++) {
        }
        if (!team) {
            pthread_mutex_lock(&pool.lock);
            while (!(team = atomic_load(&pool.task[id]))) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        my_team = team, my_id = id;
        team->body(team->arg);
        my_team = NULL;
        atomic_store(&pool.task[id], NULL);
        atomic_fetch_add(&team->finished, 1); /* the last touch: the caller may return from the region now */
    }
    return NULL;
}

/* a forked child has the pool's memory but not its threads: it starts its own */
static void after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL), pthread_cond_init(&pool.wake, NULL), pthread_mutex_init(&pool.region, NULL);
    for (int i = 0; i < MAX_THREADS; i++) atomic_store(&pool.task[i], NULL);
    pool.workers = 0;
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork); }

void phi3_parallel(int threads, void (*body)(void *), void *arg) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    threads = threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads <= 1 || my_team || pthread_mutex_trylock(&pool.region) != 0) { /* alone: one thread, nested, or busy */
        body(arg);
        return;
    }
    pthread_once(&once, register_fork_handler);
    pthread_mutex_lock(&pool.lock);
    while (pool.workers < threads - 1) {
        pthread_t id;
        if (pthread_create(&id, NULL, worker, (void *)(intptr_t)(pool.workers + 1)) != 0) break;
        pthread_detach(id);
        pool.workers++;
    }
    team_t team = {.body = body, .arg = arg, .size = pool.workers + 1 < threads ? pool.workers + 1 : threads};
    atomic_init(&team.waiting, 0), atomic_init(&team.generation, 0), atomic_init(&team.finished, 0);
    for (int i = 1; i < team.size; i++) atomic_store(&pool.task[i], &team);
    pthread_cond_broadcast(&pool.wake); /* under the lock: a worker about to sleep sees its task, or is woken */
    pthread_mutex_unlock(&pool.lock);
    my_team = &team, my_id = 0;
    body(arg);
    my_team = NULL;
    for (unsigned spins = 0; atomic_load(&team.finished) < team.size - 1; spins++)
        if (spins >= 2000) sched_yield();
    pthread_mutex_unlock(&pool.region);
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
