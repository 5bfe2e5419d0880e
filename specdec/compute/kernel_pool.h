/* The kernels' thread pool: splits one job's outputs among threads, which every kernel of this library uses. */
#ifndef SPECD_KERNEL_POOL_H
#define SPECD_KERNEL_POOL_H

#include <stddef.h>
#include <stdint.h>

#define POOL_ARGS_BYTES 256  /* a job's arguments, copied into the pool */

/* Computes outputs [n0, n1) of the job whose arguments `args` holds. */
typedef void (*pool_chunk_fn)(const void *args, int64_t n0, int64_t n1);

typedef struct {
    int64_t granule;    /* chunks hold a multiple of this many outputs */
    int64_t min_chunk;  /* and at least this many */
    int64_t min_split;  /* a job of fewer outputs runs on the caller's thread alone */
} pool_split;

/* Runs fn over outputs [0, n_out), split among the pool's threads, and returns once every output is done.
 * args (args_bytes <= POOL_ARGS_BYTES) is copied: fn never reads the caller's frame. */
void pool_run(pool_chunk_fn fn, const void *args, size_t args_bytes, int64_t n_out, pool_split split);

#endif
