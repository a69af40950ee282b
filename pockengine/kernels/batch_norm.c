/* Train-mode batch norm (batch statistics) over float32 tensors whose channels are the innermost dimension
 * (channels-last: a rows x C matrix, rows = N*H*W), forward and backward, with every per-channel sum accumulated in
 * double and the element-wise parts computed in double from the float inputs.
 *
 * ATen's channels-last CPU kernels sum in float (their error grows with N*H*W), and the contiguous kernels eager
 * autograd runs sum in double but compute the element-wise parts in float, where the backward's
 * dy - mean(dy) - (x - mean) k cancels almost entirely when a channel's statistics come from a few values (a 1x1
 * feature map at batch 2); see pockengine/kernels/batch_norm.py.
 *
 * Plain C99 + pthreads: the loops over channels (the contiguous dimension) vectorize; the rows are split into
 * `parts` ranges, one thread each (the calling thread takes the first), and per-part sums are added in part order,
 * so a result depends on the part count only. Built at first use by pockengine/kernels/native.py. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PARTS 64
#define FEW_ROWS 64 /* see pockengine_batch_norm_backward_f32 */

/* The loops below in an AVX2 version too where the compiler and the C library can pick one at load time (GCC's
 * target_clones, glibc's ifunc on x86-64): four doubles per instruction instead of SSE2's two. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTORIZED __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef VECTORIZED
#define VECTORIZED
#endif

typedef void (*rows_fn)(void *args, int64_t begin, int64_t end, int part);

typedef struct {
    rows_fn fn;
    void *args;
    int64_t begin, end;
    int part;
} task_t;

static void *run_task(void *p) {
    task_t *t = (task_t *)p;
    t->fn(t->args, t->begin, t->end, t->part);
    return NULL;
}

/* fn over rows [0, rows) in `parts` contiguous ranges, at once; a range whose thread cannot start runs here. */
static void parallel_rows(rows_fn fn, void *args, int64_t rows, int parts) {
    task_t tasks[MAX_PARTS];
    pthread_t threads[MAX_PARTS];
    int started[MAX_PARTS];
    for (int p = 0; p < parts; p++) {
        task_t t = {fn, args, rows * p / parts, rows * (p + 1) / parts, p};
        tasks[p] = t;
    }
    for (int p = 1; p < parts; p++) {
        started[p] = pthread_create(&threads[p], NULL, run_task, &tasks[p]) == 0;
        if (!started[p]) run_task(&tasks[p]);
    }
    run_task(&tasks[0]);
    for (int p = 1; p < parts; p++)
        if (started[p]) pthread_join(threads[p], NULL);
}

/* The per-part sums partial[p][0..width) added up in part order into total[0..width). */
static void add_parts(const double *partial, int parts, int64_t width, double *total) {
    memcpy(total, partial, (size_t)width * sizeof(double));
    for (int p = 1; p < parts; p++)
        for (int64_t c = 0; c < width; c++) total[c] += partial[p * width + c];
}

typedef struct {
    const float *x, *dy;
    int64_t C;
    double *partial; /* parts x (2 or 4) x C */
    const float *pivot; /* sum_moments' */
    const double *mean, *scale, *k, *grad_mean; /* input_grads' */
    const float *mean_f, *mean_lo, *scale_f, *shift_f, *k_f, *grad_mean_f; /* normalize's, input_grads_f32's */
    float *out;
} bn_args;

/* Per part, around a pivot p close to the mean (the first row, the saved mean), so that the squares do not cancel
 * in double: sum(x - p) in [0, C), sum((x - p)^2) in [C, 2C). x - p is exact in float wherever x is within a
 * factor 2 of p. */
VECTORIZED static void sum_moments(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    double *sum = a->partial + part * 2 * C, *squares = sum + C;
    const float *pivot = a->pivot;
    memset(sum, 0, (size_t)(2 * C) * sizeof(double));
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C;
        for (int64_t c = 0; c < C; c++) {
            float d = x[c] - pivot[c];
            sum[c] += d;
            squares[c] += (double)d * d;
        }
    }
}

/* y = ((x - mean_hi) - mean_lo) scale + shift in float: mean_hi + mean_lo is the mean to twice float's precision,
 * so x - mean comes out within a rounding of itself however close x is to the mean. */
VECTORIZED static void normalize(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    const float *mean_hi = a->mean_f, *mean_lo = a->mean_lo, *scale = a->scale_f, *shift = a->shift_f;
    (void)part;
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C;
        float *y = a->out + r * C;
        for (int64_t c = 0; c < C; c++) y[c] = ((x[c] - mean_hi[c]) - mean_lo[c]) * scale[c] + shift[c];
    }
}

/* Per part, with m the saved (float) mean: sum(dy) in [0, C), sum((x - m) dy) in [C, 2C). */
VECTORIZED static void sum_grads(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    double *sum = a->partial + part * 2 * C, *dot = sum + C;
    const float *mean = a->mean_f;
    memset(sum, 0, (size_t)(2 * C) * sizeof(double));
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C, *dy = a->dy + r * C;
        for (int64_t c = 0; c < C; c++) {
            sum[c] += dy[c];
            dot[c] += (double)(x[c] - mean[c]) * dy[c];
        }
    }
}

/* dx = (dy - mean(dy) - (x - mean) k) scale, k = sum((x - mean) dy) invstd^2 / count, scale = invstd w. */
VECTORIZED static void input_grads(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    const double *mean = a->mean, *scale = a->scale, *k = a->k, *grad_mean = a->grad_mean;
    (void)part;
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C, *dy = a->dy + r * C;
        float *dx = a->out + r * C;
        for (int64_t c = 0; c < C; c++)
            dx[c] = (float)((dy[c] - grad_mean[c] - (x[c] - mean[c]) * k[c]) * scale[c]);
    }
}

/* input_grads in float, with the coefficients rounded to float (as ATen's contiguous kernel computes it). */
VECTORIZED static void input_grads_f32(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    const float *mean = a->mean_f, *scale = a->scale_f, *k = a->k_f, *grad_mean = a->grad_mean_f;
    (void)part;
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C, *dy = a->dy + r * C;
        float *dx = a->out + r * C;
        for (int64_t c = 0; c < C; c++) dx[c] = (dy[c] - grad_mean[c] - (x[c] - mean[c]) * k[c]) * scale[c];
    }
}

static int clamp_parts(int parts, int64_t rows) {
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    if (parts > rows) parts = (int)rows;
    return parts < 1 ? 1 : parts;
}

/* y = (x - mean) invstd w + b with the batch's mean and invstd = 1/sqrt(var + eps) (biased variance), saved as
 * float; with running statistics (rm, rv non-NULL) their new values momentum * batch + (1 - momentum) * old, the
 * variance unbiased, in rm_out, rv_out. w, b may be NULL. Returns 0, or -1 when out of memory. */
int pockengine_batch_norm_f32(const float *x, int64_t rows, int64_t C, const float *w, const float *b,
                              const float *rm, const float *rv, double momentum, double eps, int parts, float *y,
                              float *save_mean, float *save_invstd, float *rm_out, float *rv_out) {
    parts = clamp_parts(parts, rows);
    double *buffer = malloc((size_t)(2 * parts + 2) * (size_t)C * sizeof(double) + 4 * (size_t)C * sizeof(float));
    if (buffer == NULL) return -1;
    double *sums = buffer + 2 * parts * C;
    float *mean_lo = (float *)(sums + 2 * C), *scale = mean_lo + C, *shift = scale + C;
    bn_args a = {.x = x, .C = C, .partial = buffer, .pivot = x, .mean_f = save_mean, .mean_lo = mean_lo,
                 .scale_f = scale, .shift_f = shift, .out = y};
    parallel_rows(sum_moments, &a, rows, parts);
    add_parts(buffer, parts, 2 * C, sums);
    for (int64_t c = 0; c < C; c++) {
        double n = (double)rows, offset = sums[c] / n, var_sum = sums[C + c] - offset * sums[c];
        double mean = x[c] + offset, invstd = 1.0 / sqrt(var_sum / n + eps);
        save_mean[c] = (float)mean;
        mean_lo[c] = (float)(mean - save_mean[c]);
        save_invstd[c] = (float)invstd;
        scale[c] = (float)(w ? invstd * w[c] : invstd);
        shift[c] = b ? b[c] : 0.0f;
        if (rm) rm_out[c] = (float)(momentum * mean + (1.0 - momentum) * rm[c]);
        if (rv) rv_out[c] = (float)(momentum * var_sum / (n - 1.0) + (1.0 - momentum) * rv[c]);
    }
    parallel_rows(normalize, &a, rows, parts);
    free(buffer);
    return 0;
}

/* The gradients of pockengine_batch_norm_f32's output with respect to x (dx), w (dw) and b (db), each skipped where
 * NULL; w may be NULL (1). Per-channel sums in double; dx in float from the saved statistics (as ATen's contiguous
 * kernel), except for channels of at most FEW_ROWS values: there dy - mean(dy) - (x - mean) k cancels almost
 * entirely (exactly, but for eps, at 2 values), so dx is computed in double, from the batch's statistics computed
 * again in double (rounded to float, as saved, they would leave mostly rounding error). Returns 0, or -1 when out
 * of memory. */
int pockengine_batch_norm_backward_f32(const float *dy, const float *x, int64_t rows, int64_t C, const float *w,
                                       const float *save_mean, const float *save_invstd, double eps, int parts,
                                       float *dx, float *dw, float *db) {
    parts = clamp_parts(parts, rows);
    double *buffer = malloc((size_t)(4 * parts + 10) * (size_t)C * sizeof(double) + 3 * (size_t)C * sizeof(float));
    if (buffer == NULL) return -1;
    double *grad_sums = buffer + 4 * parts * C, *moments = grad_sums + 2 * C, *mean = moments + 2 * C,
           *scale = mean + C, *k = scale + C, *grad_mean = k + C;
    float *scale_f = (float *)(grad_mean + C), *k_f = scale_f + C, *grad_mean_f = k_f + C;
    int exact = rows <= FEW_ROWS;
    bn_args a = {.x = x, .dy = dy, .C = C, .partial = buffer, .pivot = save_mean, .mean = mean, .scale = scale,
                 .k = k, .grad_mean = grad_mean, .mean_f = save_mean, .scale_f = scale_f, .k_f = k_f,
                 .grad_mean_f = grad_mean_f, .out = dx};
    parallel_rows(sum_grads, &a, rows, parts);
    add_parts(buffer, parts, 2 * C, grad_sums);
    if (exact) {
        parallel_rows(sum_moments, &a, rows, parts);
        add_parts(buffer, parts, 2 * C, moments);
    }
    for (int64_t c = 0; c < C; c++) {
        double n = (double)rows, sum = grad_sums[c], dot = grad_sums[C + c], invstd = save_invstd[c];
        mean[c] = save_mean[c];
        if (exact) {
            double offset = moments[c] / n;
            invstd = 1.0 / sqrt(moments[C + c] / n - offset * offset + eps);
            dot -= offset * sum; /* sum((x - mean) dy) around the exact mean */
            mean[c] += offset;
        }
        if (dw) dw[c] = (float)(dot * invstd);
        if (db) db[c] = (float)sum;
        scale[c] = w ? invstd * w[c] : invstd;
        k[c] = dot * invstd * invstd / n;
        grad_mean[c] = sum / n;
        scale_f[c] = (float)scale[c];
        k_f[c] = (float)k[c];
        grad_mean_f[c] = (float)grad_mean[c];
    }
    if (dx) parallel_rows(exact ? input_grads : input_grads_f32, &a, rows, parts);
    free(buffer);
    return 0;
}
