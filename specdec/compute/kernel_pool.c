/* Threads. Each output is reduced by the same code whichever thread computes it, so splitting a layer's
 * outputs among threads keeps the bits. The caller and the workers claim chunks of outputs until none are
 * left, so a worker the OS has not scheduled costs nothing: the caller takes its chunks. Workers wait for
 * the next layer spinning for a little while (the layers of one forward pass come microseconds apart),
 * then sleep.
 *
 * One caller holds the pool at a time (another computes alone). It publishes a job in two steps: it fills
 * pool.job, then release-stores a ticket that names the job, its chunk count and the next chunk to claim.
 * Every claim is a compare-and-swap of that one word, so a claim of chunk c of job J succeeds only while J
 * is the published job and c is unclaimed; J's caller is then still waiting for c, and pool.job still holds
 * J, unchanged until that caller has counted every chunk finished and returned. A thread enters a job by a
 * claim and leaves it by counting the chunk finished; between jobs it reads nothing but the ticket. */
#include "kernel_pool.h"

#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#define MAX_THREADS 16
#define SPIN_ROUNDS 2000    /* a few microseconds to tens of them, by how long a pause instruction takes here */
#define CHUNK_BITS 16       /* a ticket is job id (32 bits) | chunks (16) | next chunk (16) */
#define CHUNK_MASK ((1ull << CHUNK_BITS) - 1)
#define MAX_CHUNKS ((int64_t)CHUNK_MASK)

typedef struct {
    pool_chunk_fn fn;
    int64_t n_out, chunk;  /* outputs, and outputs per chunk */
    _Alignas(64) unsigned char args[POOL_ARGS_BYTES];
} pool_job;

static struct {
    pthread_mutex_t lock;          /* guards workers, and the sleep and wake of waiting workers */
    pthread_cond_t wake;
    int workers;                   /* started so far */
    atomic_int threads;            /* threads a job may be split among, the caller's included */
    atomic_int busy;               /* a caller holds the pool */
    pool_job job;                  /* the published job: written only by the caller that holds the pool, before its ticket */
    _Atomic uint64_t ticket;       /* job id | chunks | next chunk; job id 0: none yet */
    atomic_long finished;          /* chunks of the published job done */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .threads = 1};

static inline uint64_t ticket_job(uint64_t t) { return t >> (2 * CHUNK_BITS); }
static inline int64_t ticket_chunks(uint64_t t) { return (int64_t)((t >> CHUNK_BITS) & CHUNK_MASK); }
static inline int64_t ticket_next(uint64_t t) { return (int64_t)(t & CHUNK_MASK); }

/* Claims and runs chunks of job job_id while any are left. */
static void claim_chunks(uint64_t job_id) {
    uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    while (ticket_job(t) == job_id && ticket_next(t) < ticket_chunks(t)) {
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acquire, memory_order_acquire))
            continue;  /* t now holds the ticket as it is */
        const pool_job *job = &pool.job;
        const int64_t n0 = ticket_next(t) * job->chunk, n1 = n0 + job->chunk < job->n_out ? n0 + job->chunk : job->n_out;
        job->fn(job->args, n0, n1);
        atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);  /* the last read of pool.job comes before */
        t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t job_id;
        for (int spin = 0; (job_id = ticket_job(atomic_load_explicit(&pool.ticket, memory_order_acquire))) == seen;
             spin++) {
            if (spin < SPIN_ROUNDS) { _mm_pause(); continue; }
            pthread_mutex_lock(&pool.lock);
            while ((job_id = ticket_job(atomic_load_explicit(&pool.ticket, memory_order_acquire))) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
            break;
        }
        seen = job_id;
        claim_chunks(job_id);
    }
    return NULL;
}

/* How many threads may split each layer's outputs (1: the caller's alone); returns how many will. */
int small_gemm_set_threads(int threads) {
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    pthread_mutex_lock(&pool.lock);
    for (; pool.workers < threads - 1; pool.workers++) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, NULL) != 0) break;
        pthread_detach(thread);
    }
    const int used = threads < pool.workers + 1 ? threads : pool.workers + 1;
    atomic_store_explicit(&pool.threads, used, memory_order_relaxed);
    pthread_mutex_unlock(&pool.lock);
    return used;
}

/* Outputs per chunk: a few chunks per thread, and never more chunks than a ticket counts. */
static int64_t chunk_size(int64_t n_out, pool_split split, int threads) {
    int64_t chunk = (n_out / (4 * threads) + split.granule - 1) / split.granule * split.granule;
    if (chunk < split.min_chunk) chunk = split.min_chunk;
    while ((n_out + chunk - 1) / chunk > MAX_CHUNKS) chunk *= 2;
    return chunk;
}

void pool_run(pool_chunk_fn fn, const void *args, size_t args_bytes, int64_t n_out, pool_split split) {
    const int threads = atomic_load_explicit(&pool.threads, memory_order_relaxed);
    if (threads <= 1 || n_out < split.min_split || args_bytes > POOL_ARGS_BYTES
        || atomic_exchange_explicit(&pool.busy, 1, memory_order_acquire)) {
        fn(args, 0, n_out);
        return;
    }
    /* Every thread that entered the previous job left it before its caller released the pool. */
    pool.job.fn = fn;
    pool.job.n_out = n_out;
    pool.job.chunk = chunk_size(n_out, split, threads);
    memcpy(pool.job.args, args, args_bytes);
    const int64_t chunks = (n_out + pool.job.chunk - 1) / pool.job.chunk;
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    uint64_t job_id = (ticket_job(atomic_load_explicit(&pool.ticket, memory_order_relaxed)) + 1) & 0xFFFFFFFFull;
    if (job_id == 0) job_id = 1;  /* 0 names no job */
    pthread_mutex_lock(&pool.lock);
    atomic_store_explicit(&pool.ticket, (job_id << (2 * CHUNK_BITS)) | ((uint64_t)chunks << CHUNK_BITS), memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    claim_chunks(job_id);
    while (atomic_load_explicit(&pool.finished, memory_order_acquire) < chunks) _mm_pause();
    atomic_store_explicit(&pool.busy, 0, memory_order_release);
}
