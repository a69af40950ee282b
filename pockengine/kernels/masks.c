/* Bit masks of ReLU-like activations: packed in the forward pass, applied to the gradient in the backward pass.
 *
 * Plain C99 that compilers vectorize on their own (x86-64 SSE2, AArch64 NEON), built at first use by
 * pockengine/kernels/native.py. Element j of a tensor is its j-th element in memory order; bit k of byte i stands
 * for element 8i + k. */
#include <stdint.h>
#include <string.h>

#define BLOCK 512 /* elements compared per pass, so the 0/1 bytes stay in the L1 cache */

/* bits[i] bit k = 1 where lo < x[8i+k] and (no hi or x[8i+k] < hi): where hardtanh/ReLU pass the gradient (a NaN
 * does not pass it; its loss stops the step anyway). The bits past n are 0. */
void pockengine_pack_keep_f32(const float *x, int64_t n, float lo, int has_hi, float hi, uint8_t *bits) {
    uint8_t keep[BLOCK];
    int64_t whole = n / 8 * 8;
    for (int64_t start = 0; start < whole; start += BLOCK) {
        int64_t len = whole - start < BLOCK ? whole - start : BLOCK;
        const float *p = x + start;
        if (has_hi)
            for (int64_t j = 0; j < len; j++) keep[j] = (uint8_t)((p[j] > lo) & (p[j] < hi));
        else
            for (int64_t j = 0; j < len; j++) keep[j] = (uint8_t)(p[j] > lo);
        /* eight 0/1 bytes read as one little-endian word times this constant carry byte k's bit to bit 56 + k */
        for (int64_t j = 0; j < len; j += 8) {
            uint64_t word;
            memcpy(&word, keep + j, 8);
            bits[(start + j) / 8] = (uint8_t)((word * 0x0102040810204080ull) >> 56);
        }
    }
    if (whole < n) {
        unsigned byte = 0;
        for (int64_t j = whole; j < n; j++)
            byte |= (unsigned)((x[j] > lo) & (!has_hi | (x[j] < hi))) << (j - whole);
        bits[whole / 8] = (uint8_t)byte;
    }
}

/* Filled by pockengine_init, once, before any call: per byte value, the eight 32-bit masks that keep (all ones)
 * or zero (all zeros) the float of each bit. */
static uint32_t spread[256][8];

void pockengine_init(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 8; k++) spread[b][k] = (b >> k) & 1 ? 0xFFFFFFFFu : 0u;
}

/* g[j] = +0.0 where bit j is 0 (ATen's backward writes +0.0 there too, whatever g held), in place. */
void pockengine_apply_keep_f32(float *g, int64_t n, const uint8_t *bits) {
    uint32_t *words = (uint32_t *)g;
    int64_t whole = n / 8;
    for (int64_t i = 0; i < whole; i++) {
        const uint32_t *m = spread[bits[i]];
        uint32_t *w = words + 8 * i;
        for (int k = 0; k < 8; k++) w[k] &= m[k];
    }
    for (int64_t j = whole * 8; j < n; j++) words[j] &= spread[bits[whole]][j - whole * 8];
}
