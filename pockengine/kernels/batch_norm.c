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
    double *partial; /* parts x (1 or 2) x C */
    const double *mean, *scale, *shift, *k, *grad_mean;
    float *out;
} bn_args;

static void sum_x(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    double *acc = a->partial + part * C;
    memset(acc, 0, (size_t)C * sizeof(double));
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C;
        for (int64_t c = 0; c < C; c++) acc[c] += x[c];
    }
}

static void sum_squares(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    double *acc = a->partial + part * C;
    const double *mean = a->mean;
    memset(acc, 0, (size_t)C * sizeof(double));
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C;
        for (int64_t c = 0; c < C; c++) {
            double d = x[c] - mean[c];
            acc[c] += d * d;
        }
    }
}

static void normalize(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    const double *mean = a->mean, *scale = a->scale, *shift = a->shift;
    (void)part;
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C;
        float *y = a->out + r * C;
        for (int64_t c = 0; c < C; c++) y[c] = (float)((x[c] - mean[c]) * scale[c] + shift[c]);
    }
}

/* Per part, with m the saved (float) mean: sum(dy), sum((x - m) dy), sum(x - m), sum((x - m)^2), C each. */
static void sum_grads(void *v, int64_t begin, int64_t end, int part) {
    bn_args *a = (bn_args *)v;
    int64_t C = a->C;
    double *sum = a->partial + part * 4 * C, *dot = sum + C, *shifted = dot + C, *squares = shifted + C;
    const double *mean = a->mean;
    memset(sum, 0, (size_t)(4 * C) * sizeof(double));
    for (int64_t r = begin; r < end; r++) {
        const float *x = a->x + r * C, *dy = a->dy + r * C;
        for (int64_t c = 0; c < C; c++) {
            double d = x[c] - mean[c];
            sum[c] += dy[c];
            dot[c] += d * dy[c];
            shifted[c] += d;
            squares[c] += d * d;
        }
    }
}

/* dx = (dy - mean(dy) - (x - mean) k) scale, k = sum((x - mean) dy) invstd^2 / count, scale = invstd w. */
static void input_grads(void *v, int64_t begin, int64_t end, int part) {
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
    double *buffer = malloc((size_t)(parts + 4) * (size_t)C * sizeof(double));
    if (buffer == NULL) return -1;
    double *mean = buffer + parts * C, *var_sum = mean + C, *scale = var_sum + C, *shift = scale + C;
    bn_args a = {x, NULL, C, buffer, mean, scale, shift, NULL, NULL, y};
    parallel_rows(sum_x, &a, rows, parts);
    add_parts(buffer, parts, C, mean);
    for (int64_t c = 0; c < C; c++) mean[c] /= (double)rows;
    parallel_rows(sum_squares, &a, rows, parts);
    add_parts(buffer, parts, C, var_sum);
    for (int64_t c = 0; c < C; c++) {
        double invstd = 1.0 / sqrt(var_sum[c] / (double)rows + eps);
        save_mean[c] = (float)mean[c];
        save_invstd[c] = (float)invstd;
        scale[c] = w ? invstd * w[c] : invstd;
        shift[c] = b ? b[c] : 0.0;
        if (rm) rm_out[c] = (float)(momentum * mean[c] + (1.0 - momentum) * rm[c]);
        if (rv) rv_out[c] = (float)(momentum * var_sum[c] / (double)(rows - 1) + (1.0 - momentum) * rv[c]);
    }
    parallel_rows(normalize, &a, rows, parts);
    free(buffer);
    return 0;
}

/* The gradients of pockengine_batch_norm_f32's output with respect to x (dx), w (dw) and b (db), each skipped where
 * NULL; w may be NULL (1). The batch's mean and invstd are computed again in double (from sums around the saved
 * float mean, so without cancellation): rounded to float, as saved, they would make dx mostly rounding error where
 * it cancels (a channel of few values). Returns 0, or -1 when out of memory. */
int pockengine_batch_norm_backward_f32(const float *dy, const float *x, int64_t rows, int64_t C, const float *w,
                                       const float *save_mean, double eps, int parts, float *dx, float *dw,
                                       float *db) {
    parts = clamp_parts(parts, rows);
    double *buffer = malloc((size_t)(4 * parts + 8) * (size_t)C * sizeof(double));
    if (buffer == NULL) return -1;
    double *sums = buffer + 4 * parts * C, *mean = sums + 4 * C, *scale = mean + C, *k = scale + C,
           *grad_mean = k + C;
    for (int64_t c = 0; c < C; c++) mean[c] = save_mean[c];
    bn_args a = {x, dy, C, buffer, mean, scale, NULL, k, grad_mean, dx};
    parallel_rows(sum_grads, &a, rows, parts);
    add_parts(buffer, parts, 4 * C, sums);
    for (int64_t c = 0; c < C; c++) {
        double n = (double)rows, sum = sums[c], offset = sums[2 * C + c] / n;
        double invstd = 1.0 / sqrt(sums[3 * C + c] / n - offset * offset + eps);
        double dot = sums[C + c] - offset * sum; /* sum((x - mean) dy) around the exact mean */
        mean[c] += offset;
        if (dw) dw[c] = (float)(dot * invstd);
        if (db) db[c] = (float)sum;
        scale[c] = w ? invstd * w[c] : invstd;
        k[c] = dot * invstd * invstd / n;
        grad_mean[c] = sum / n;
    }
    if (dx) parallel_rows(input_grads, &a, rows, parts);
    free(buffer);
    return 0;
}
