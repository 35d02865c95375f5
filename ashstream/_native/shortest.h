/* The shortest decimal digits that read back as the same double.
 *
 * The Ryu algorithm (Ulf Adams, "Ryu: fast float-to-string conversion", PLDI 2018):
 * the value's rounding interval is scaled by a 125-bit power of five so that its decimal
 * digits can be cut one at a time with 64-bit integers. It gives the same digits as
 * Python's repr (David Gay's shortest mode: shortest, then closest, ties to even), which
 * is what ashstream.encode.format_float and Arrow produce. Written for ashstream from the
 * paper; the differential tests compare it with repr() over random bit patterns.
 */
#ifndef ASHSTREAM_SHORTEST_H
#define ASHSTREAM_SHORTEST_H

#include <stdint.h>

#include "pow5_tables.h"

#define DOUBLE_MANTISSA_BITS 52
#define DOUBLE_BIAS 1023

typedef struct {
    uint64_t digits; /* no trailing zeros, except for zero itself */
    int32_t exponent; /* value = digits * 10**exponent */
} Shortest;

static inline uint32_t pow5_bits(int32_t e) { return (uint32_t)(((uint64_t)e * 1217359) >> 19) + 1; }
static inline uint32_t log10_pow2(int32_t e) { return (uint32_t)(((uint64_t)e * 78913) >> 18); }
static inline uint32_t log10_pow5(int32_t e) { return (uint32_t)(((uint64_t)e * 732923) >> 20); }

static inline int multiple_of_pow5(uint64_t value, uint32_t p)
{
    uint32_t count = 0;
    while (value % 5 == 0) { /* value > 0 here */
        value /= 5;
        if (++count >= p) return 1;
    }
    return count >= p;
}

static inline int multiple_of_pow2(uint64_t value, uint32_t p) { return (value & ((1ull << p) - 1)) == 0; }

/* (m * mul) >> shift, with mul a 125-bit number in two halves and shift > 64. */
static inline uint64_t mul_shift(uint64_t m, const uint64_t *mul, int32_t shift)
{
    const __uint128_t low = (__uint128_t)m * mul[0];
    const __uint128_t high = (__uint128_t)m * mul[1];
    return (uint64_t)(((low >> 64) + high) >> (shift - 64));
}

/* Digits of a finite, non-zero double given by its mantissa and exponent bits. */
static Shortest shortest_digits(uint64_t ieee_mantissa, uint32_t ieee_exponent)
{
    int32_t e2;
    uint64_t m2;
    if (ieee_exponent == 0) { /* subnormal; two extra bits for the interval's ends */
        e2 = 1 - DOUBLE_BIAS - DOUBLE_MANTISSA_BITS - 2;
        m2 = ieee_mantissa;
    } else {
        e2 = (int32_t)ieee_exponent - DOUBLE_BIAS - DOUBLE_MANTISSA_BITS - 2;
        m2 = (1ull << DOUBLE_MANTISSA_BITS) | ieee_mantissa;
    }
    const int accept_bounds = (m2 & 1) == 0; /* round-half-even reads the ends back */
    /* The interval is [mv - mm_shift - 1, mv + 2] in units of 2**e2; its lower half is
       narrower at a power of two. */
    const uint64_t mv = 4 * m2;
    const uint32_t mm_shift = ieee_mantissa != 0 || ieee_exponent <= 1;
    uint64_t vr, vp, vm;
    int32_t e10;
    int vm_exact = 0, vr_exact = 0; /* whether the digits cut so far were all zero */
    if (e2 >= 0) {
        const uint32_t q = log10_pow2(e2) - (e2 > 3);
        e10 = (int32_t)q;
        const int32_t k = POW5_INV_BITCOUNT + (int32_t)pow5_bits((int32_t)q) - 1;
        const int32_t shift = -e2 + (int32_t)q + k;
        vr = mul_shift(mv, POW5_INV[q], shift);
        vp = mul_shift(mv + 2, POW5_INV[q], shift);
        vm = mul_shift(mv - 1 - mm_shift, POW5_INV[q], shift);
        if (q <= 21) { /* only then can 5**q divide a 55-bit number */
            if (mv % 5 == 0)
                vr_exact = multiple_of_pow5(mv, q);
            else if (accept_bounds)
                vm_exact = multiple_of_pow5(mv - 1 - mm_shift, q);
            else
                vp -= (uint64_t)multiple_of_pow5(mv + 2, q);
        }
    } else {
        const uint32_t q = log10_pow5(-e2) - (-e2 > 1);
        e10 = (int32_t)q + e2;
        const int32_t i = -e2 - (int32_t)q;
        const int32_t k = (int32_t)pow5_bits(i) - POW5_BITCOUNT;
        const int32_t shift = (int32_t)q - k;
        vr = mul_shift(mv, POW5[i], shift);
        vp = mul_shift(mv + 2, POW5[i], shift);
        vm = mul_shift(mv - 1 - mm_shift, POW5[i], shift);
        if (q <= 1) {
            vr_exact = 1; /* mv * 5**i / 2**q with q <= 1 and mv even */
            if (accept_bounds)
                vm_exact = mm_shift == 1;
            else
                --vp;
        } else if (q < 63) {
            vr_exact = multiple_of_pow2(mv, q);
        }
    }
    /* Cut digits while the interval still holds a shorter number. */
    int32_t removed = 0;
    uint32_t last_removed = 0;
    uint64_t output;
    if (vm_exact || vr_exact) { /* rare: exact ends need the careful loop */
        for (;;) {
            const uint64_t vp_div = vp / 10, vm_div = vm / 10;
            if (vp_div <= vm_div) break;
            const uint32_t vm_rem = (uint32_t)(vm - 10 * vm_div);
            const uint64_t vr_div = vr / 10;
            vm_exact &= vm_rem == 0;
            vr_exact &= last_removed == 0;
            last_removed = (uint32_t)(vr - 10 * vr_div);
            vr = vr_div;
            vp = vp_div;
            vm = vm_div;
            ++removed;
        }
        if (vm_exact) {
            for (;;) {
                const uint64_t vm_div = vm / 10;
                if (vm - 10 * vm_div != 0) break;
                const uint64_t vr_div = vr / 10;
                vr_exact &= last_removed == 0;
                last_removed = (uint32_t)(vr - 10 * vr_div);
                vr = vr_div;
                vp /= 10;
                vm = vm_div;
                ++removed;
            }
        }
        if (vr_exact && last_removed == 5 && vr % 2 == 0) last_removed = 4; /* tie to even */
        output = vr + ((vr == vm && (!accept_bounds || !vm_exact)) || last_removed >= 5);
    } else {
        int round_up = 0;
        if (vp / 100 > vm / 100) { /* two digits at once: most doubles have 16-17 */
            const uint64_t vr_div = vr / 100;
            round_up = vr - 100 * vr_div >= 50;
            vr = vr_div;
            vp /= 100;
            vm /= 100;
            removed += 2;
        }
        for (;;) {
            const uint64_t vp_div = vp / 10, vm_div = vm / 10;
            if (vp_div <= vm_div) break;
            const uint64_t vr_div = vr / 10;
            round_up = vr - 10 * vr_div >= 5;
            vr = vr_div;
            vp = vp_div;
            vm = vm_div;
            ++removed;
        }
        output = vr + (vr == vm || round_up);
    }
    int32_t exponent = e10 + removed;
    while (output % 10 == 0) { /* a round-up can leave one (9.99 -> 10.0) */
        output /= 10;
        ++exponent;
    }
    return (Shortest){output, exponent};
}

#endif
