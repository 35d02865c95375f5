/* ashstream._encoder: a batch's columns joined into Typst row literals in one buffer.
 *
 * The compiled twin of ashstream/encode.py (the reference, which documents every literal
 * form): it reads Arrow buffers in place through the Arrow C data interface and writes
 * each row as PREFIX_1 VALUE_1 PREFIX_2 VALUE_2 ... CLOSE, without a Python object per
 * value, with the GIL released. ashstream/encode_native.py decides which columns come
 * here as values and which as text the reference already made (nested and rare types);
 * the differential tests hold the two to the same bytes.
 *
 * Safety: Python validates every array before it comes here (Arrow's own full
 * validation for strings and binaries, the cheap one for the rest), and this file checks
 * again everything it reads against the buffers' sizes, which Python passes (the C data
 * interface gives pointers only): format, buffer count, length, every offset, index and
 * bitmap (check_layout, check_indices).
 * The output buffer is sized first with an upper bound per column, so writing needs no
 * checks; the bound is checked once more at the end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "shortest.h"

/* ------------------------------------------------------------------ Arrow C interface */

#define ARROW_FLAG_DICTIONARY_ORDERED 1

struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

/* ------------------------------------------------------------------------- constants */

#define MIN_EPOCH_DAY (-4371587LL) /* -9999-01-01, as in encode.py */
#define MAX_EPOCH_DAY 2932896LL    /* 9999-12-31 */
#define SECONDS_PER_DAY 86400LL
#define I64_MIN_LITERAL "(-9223372036854775807 - 1)"
#define DECIMAL_MAX_SCALE 28

/* What a decimal beyond Typst's range becomes; under the error policy Python sends such
   columns to the reference, which raises in column order. */
enum DecimalPolicy { AS_FLOAT = 0, AS_STRING = 1 };

typedef enum {
    K_NULL,
    K_BOOL,
    K_INT,
    K_UINT,
    K_FLOAT64,
    K_DECIMAL,
    K_STRING,
    K_BINARY,
    K_FIXED_BINARY,
    K_DATE32,
    K_DATE64,
    K_TIMESTAMP,
    K_TIME,
    K_DURATION,
    K_TEXT,      /* text made by the reference encoder: copied, null as none */
    K_DICT_TEXT, /* dictionary indices into such text */
} Kind;

/* Bytes a value of a fixed-size kind can take at most (the longest forms, rounded up). */
static const size_t MAX_VALUE_BYTES[] = {
    [K_NULL] = 4,
    [K_BOOL] = 5,
    [K_INT] = 32,      /* I64_MIN_LITERAL is 26 */
    [K_UINT] = 32,     /* decimal("18446744073709551615") is 30 */
    [K_FLOAT64] = 32,  /* -0.0000012345678901234567 is 25 */
    [K_DECIMAL] = 96,  /* float("-0.<38 zeros and digits>") */
    [K_DATE32] = 48,   /* datetime(year: -9999, month: 12, day: 31) is 41 */
    [K_DATE64] = 48,
    [K_TIMESTAMP] = 96, /* 77 */
    [K_TIME] = 48,      /* 42 */
    [K_DURATION] = 112, /* (duration(seconds: <26>) + duration(seconds: 1) / 1000000000 * <9>) */
};

typedef struct {
    Kind kind;
    const char *prefix;
    size_t prefix_len;
    char short_prefix[32]; /* the prefix when it fits, for one fixed-size move */
    int64_t offset; /* of the array, in elements */
    const uint8_t *validity;
    const void *values; /* buffer 1: values, offsets, or bits */
    const uint8_t *data; /* buffer 2 of strings and binaries */
    int width;          /* bytes of an integer, decimal, index or fixed binary */
    int large;          /* 64-bit offsets */
    int scale, precision;
    int64_t per_second; /* ticks per second of times, timestamps, durations */
    int64_t lo, hi;     /* ticks inside Typst's datetime range */
    int escapes;        /* strings: some byte needs an escape */
    /* K_DICT_TEXT: the dictionary (a string array) */
    int64_t dict_length, dict_offset;
    const uint8_t *dict_validity;
    const void *dict_offsets;
    const uint8_t *dict_data;
    int dict_large;
    int index_signed;
    /* results */
    int64_t out_of_range;
    int64_t decimals_over;
    /* dates repeat: the last one's text */
    int64_t memo_day;
    int memo_len;
    char memo[64];
} Column;

/* ------------------------------------------------------------------- small writers */

static const char DIGITS2[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static inline char *put(char *out, const char *text, size_t n)
{
    memcpy(out, text, n);
    return out + n;
}

#define PUT(out, literal) put((out), (literal), sizeof(literal) - 1)

/* Output buffers have SLACK bytes past their bound, so that short pieces can be copied
   with one fixed-size move (which the compiler inlines) instead of a call to memcpy. */
#define SLACK 64

static inline int digits10(uint64_t v)
{
    int n = 1;
    for (;;) {
        if (v < 10) return n;
        if (v < 100) return n + 1;
        if (v < 1000) return n + 2;
        if (v < 10000) return n + 3;
        v /= 10000;
        n += 4;
    }
}

static inline char *write_u64(char *out, uint64_t v)
{
    const int n = digits10(v);
    char *p = out + n;
    while (v >= 100) {
        const unsigned r = (unsigned)(v % 100);
        v /= 100;
        p -= 2;
        memcpy(p, DIGITS2 + 2 * r, 2);
    }
    if (v >= 10)
        memcpy(p - 2, DIGITS2 + 2 * v, 2);
    else
        p[-1] = (char)('0' + v);
    return out + n;
}

static inline char *write_i64(char *out, int64_t v)
{
    if (v < 0) {
        *out++ = '-';
        return write_u64(out, 0 - (uint64_t)v);
    }
    return write_u64(out, (uint64_t)v);
}

/* An int64 as ashstream.encode.format_int writes it. */
static inline char *write_int(char *out, int64_t v)
{
    if (v == INT64_MIN) return PUT(out, I64_MIN_LITERAL);
    return write_i64(out, v);
}

static inline char *write_u128(char *out, unsigned __int128 v)
{
    if (v <= UINT64_MAX) return write_u64(out, (uint64_t)v);
    char buf[48];
    char *p = buf + sizeof(buf);
    const uint64_t chunk = 10000000000000000000ull; /* 10**19 */
    while (v > UINT64_MAX) {
        uint64_t r = (uint64_t)(v % chunk);
        v /= chunk;
        for (int i = 0; i < 19; i++) {
            *--p = (char)('0' + r % 10);
            r /= 10;
        }
    }
    out = write_u64(out, (uint64_t)v);
    return put(out, p, (size_t)(buf + sizeof(buf) - p));
}

static inline int is_valid(const uint8_t *validity, int64_t i)
{
    return validity == NULL || ((validity[i >> 3] >> (i & 7)) & 1);
}

/* ------------------------------------------------------------------------- floats */

static char *write_double(char *out, double value)
{
    uint64_t bits;
    memcpy(&bits, &value, sizeof(bits));
    const int negative = (int)(bits >> 63);
    const uint64_t mantissa = bits & ((1ull << DOUBLE_MANTISSA_BITS) - 1);
    const uint32_t exponent = (uint32_t)((bits >> DOUBLE_MANTISSA_BITS) & 0x7ff);
    if (exponent == 0x7ff) {
        if (mantissa) return PUT(out, "float.nan");
        return negative ? PUT(out, "-float.inf") : PUT(out, "float.inf");
    }
    if (negative) *out++ = '-';
    if (exponent == 0 && mantissa == 0) return PUT(out, "0.0");
    const Shortest s = shortest_digits(mantissa, exponent);
    char digits[48]; /* 17 at most; the rest lets the fixed-size moves below read it */
    const int n = (int)(write_u64(digits, s.digits) - digits);
    const int e = s.exponent + n - 1; /* the exponent of the first digit */
    /* Arrow's (and format_float's) layout: plain digits for -7 < e < 10. */
    if (e >= 0 && e < 10) {
        memcpy(out, digits, 24);
        if (n <= e + 1) {
            out += n;
            for (int i = n; i <= e; i++) *out++ = '0';
            return PUT(out, ".0");
        }
        out += e + 1;
        *out++ = '.';
        memcpy(out, digits + e + 1, 24);
        return out + (n - e - 1);
    }
    if (e < 0 && e > -7) {
        out = PUT(out, "0.");
        for (int i = 0; i < -e - 1; i++) *out++ = '0';
        memcpy(out, digits, 24);
        return out + n;
    }
    *out++ = digits[0];
    if (n > 1) {
        *out++ = '.';
        memcpy(out, digits + 1, 24);
        out += n - 1;
    }
    *out++ = 'e';
    *out++ = e > 0 ? '+' : '-';
    return write_u64(out, (uint64_t)(e > 0 ? e : -e));
}

/* ----------------------------------------------------------------------- decimals */

static inline __int128 read_decimal(const Column *c, int64_t i)
{
    const uint8_t *p = (const uint8_t *)c->values + (size_t)i * (size_t)c->width;
    if (c->width == 4) {
        int32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    if (c->width == 8) {
        int64_t v;
        memcpy(&v, p, 8);
        return v;
    }
    uint64_t low;
    int64_t high;
    memcpy(&low, p, 8);
    memcpy(&high, p + 8, 8);
    return (__int128)(((unsigned __int128)(uint64_t)high << 64) | low);
}

/* The plain digits of unscaled * 10**-scale (scale >= 0) into text; returns its length. */
static int decimal_text(char *text, __int128 unscaled, int scale, unsigned __int128 *magnitude)
{
    char *t = text;
    unsigned __int128 m;
    if (unscaled < 0) {
        *t++ = '-';
        m = (unsigned __int128)0 - (unsigned __int128)unscaled;
    } else {
        m = (unsigned __int128)unscaled;
    }
    *magnitude = m;
    char digits[48];
    const int n = (int)(write_u128(digits, m) - digits);
    if (scale == 0) {
        t = put(t, digits, (size_t)n);
    } else if (n <= scale) {
        t = PUT(t, "0.");
        for (int i = n; i < scale; i++) *t++ = '0';
        t = put(t, digits, (size_t)n);
    } else {
        t = put(t, digits, (size_t)(n - scale));
        *t++ = '.';
        t = put(t, digits + n - scale, (size_t)scale);
    }
    return (int)(t - text);
}

static const unsigned __int128 DECIMAL_MAX_MANTISSA = ((unsigned __int128)1 << 96) - 1;

static char *write_decimal(char *out, Column *c, int64_t i, int policy)
{
    char text[96];
    unsigned __int128 magnitude;
    const int n = decimal_text(text, read_decimal(c, i), c->scale, &magnitude);
    int fits;
    if (c->precision <= DECIMAL_MAX_SCALE && c->scale <= DECIMAL_MAX_SCALE)
        fits = 1; /* every value of the type fits, as in the reference */
    else if (c->scale > DECIMAL_MAX_SCALE)
        fits = 0;
    else
        fits = magnitude <= DECIMAL_MAX_MANTISSA;
    if (fits) {
        out = PUT(out, "decimal(\"");
        out = put(out, text, (size_t)n);
        return PUT(out, "\")");
    }
    c->decimals_over++;
    if (policy == AS_FLOAT) {
        out = PUT(out, "float(\"");
        out = put(out, text, (size_t)n);
        return PUT(out, "\")");
    }
    *out++ = '"';
    out = put(out, text, (size_t)n);
    *out++ = '"';
    return out;
}

/* ------------------------------------------------------------------------ strings */

/* The escape of each byte ("" for none): the rules of encode.quote_string. */
static char ESCAPE[256][8];
static uint8_t ESCAPE_LEN[256];

static void init_escapes(void)
{
    for (int b = 0; b < 256; b++) {
        ESCAPE_LEN[b] = 0;
        if (b == '\\' || b == '"') {
            ESCAPE[b][0] = '\\';
            ESCAPE[b][1] = (char)b;
            ESCAPE_LEN[b] = 2;
        } else if (b == '\n' || b == '\r' || b == '\t') {
            ESCAPE[b][0] = '\\';
            ESCAPE[b][1] = b == '\n' ? 'n' : b == '\r' ? 'r' : 't';
            ESCAPE_LEN[b] = 2;
        } else if (b < 0x20 || b == 0x7f) {
            ESCAPE_LEN[b] = (uint8_t)snprintf(ESCAPE[b], sizeof(ESCAPE[b]), "\\u{%x}", b);
        }
    }
}

static inline char *write_escaped(char *out, const uint8_t *s, int64_t n)
{
    int64_t start = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t len = ESCAPE_LEN[s[i]];
        if (len) {
            out = put(out, (const char *)s + start, (size_t)(i - start));
            out = put(out, ESCAPE[s[i]], len);
            start = i + 1;
        }
    }
    return put(out, (const char *)s + start, (size_t)(n - start));
}

static inline int64_t offset_at(const void *offsets, int large, int64_t i)
{
    if (large) return ((const int64_t *)offsets)[i];
    return ((const int32_t *)offsets)[i];
}

/* --------------------------------------------------------------- dates and times */

/* Year, month and day of a day count from 1970-01-01 (proleptic Gregorian; Howard
   Hinnant's days_from_civil inverse). */
static inline void civil_from_days(int64_t z, int64_t *year, unsigned *month, unsigned *day)
{
    z += 719468;
    const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    const unsigned doe = (unsigned)(z - era * 146097);
    const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const unsigned mp = (5 * doy + 2) / 153;
    *day = doy - (153 * mp + 2) / 5 + 1;
    *month = mp < 10 ? mp + 3 : mp - 9;
    *year = (int64_t)yoe + era * 400 + (*month <= 2);
}

static inline int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && (a < 0)) q--;
    return q;
}

/* a - q * b for q = floor_div(a, b): in [0, b), though q * b may not fit an int64
   (the first nanosecond timestamps), so computed modulo 2**64. */
static inline uint64_t floor_rem(int64_t a, int64_t q, int64_t b)
{
    return (uint64_t)a - (uint64_t)q * (uint64_t)b;
}

static inline char *write_small(char *out, unsigned v) /* 0..99 */
{
    if (v < 10) {
        *out++ = (char)('0' + v);
        return out;
    }
    return put(out, DIGITS2 + 2 * v, 2);
}

/* "datetime(year: Y, month: M, day: D" of an epoch day, from the column's memo. */
static inline char *write_day(char *out, Column *c, int64_t day)
{
    if (day != c->memo_day || c->memo_len == 0) {
        int64_t year;
        unsigned month, dom;
        civil_from_days(day, &year, &month, &dom);
        char *m = c->memo;
        m = PUT(m, "datetime(year: ");
        m = write_i64(m, year);
        m = PUT(m, ", month: ");
        m = write_small(m, month);
        m = PUT(m, ", day: ");
        m = write_small(m, dom);
        c->memo_len = (int)(m - c->memo);
        c->memo_day = day;
    }
    memcpy(out, c->memo, sizeof(c->memo)); /* memo_len <= 41 */
    return out + c->memo_len;
}

static inline char *write_time_of_day(char *out, int64_t seconds) /* 0..86399 */
{
    out = write_small(out, (unsigned)(seconds / 3600));
    out = PUT(out, ", minute: ");
    out = write_small(out, (unsigned)(seconds / 60 % 60));
    out = PUT(out, ", second: ");
    out = write_small(out, (unsigned)(seconds % 60));
    *out++ = ')';
    return out;
}

static inline int64_t read_i64(const Column *c, int64_t i) { return ((const int64_t *)c->values)[i]; }

/* --------------------------------------------------------------------- one value */

static inline int64_t read_signed(const void *values, int width, int64_t i)
{
    switch (width) {
    case 1: return ((const int8_t *)values)[i];
    case 2: return ((const int16_t *)values)[i];
    case 4: return ((const int32_t *)values)[i];
    default: return ((const int64_t *)values)[i];
    }
}

static inline uint64_t read_unsigned(const void *values, int width, int64_t i)
{
    switch (width) {
    case 1: return ((const uint8_t *)values)[i];
    case 2: return ((const uint16_t *)values)[i];
    case 4: return ((const uint32_t *)values)[i];
    default: return ((const uint64_t *)values)[i];
    }
}

#define NONE(out) PUT((out), "none")

/* The value of row i (physical index j = offset + i) of column c. */
static inline char *write_value(char *out, Column *c, int64_t j, int policy)
{
    if (c->kind == K_NULL || !is_valid(c->validity, j)) return NONE(out);
    switch (c->kind) {
    case K_BOOL: {
        const uint8_t *bits = (const uint8_t *)c->values;
        return ((bits[j >> 3] >> (j & 7)) & 1) ? PUT(out, "true") : PUT(out, "false");
    }
    case K_INT: return write_int(out, read_signed(c->values, c->width, j));
    case K_UINT: {
        const uint64_t v = read_unsigned(c->values, c->width, j);
        if (v <= (uint64_t)INT64_MAX) return write_u64(out, v);
        out = PUT(out, "decimal(\"");
        out = write_u64(out, v);
        return PUT(out, "\")");
    }
    case K_FLOAT64: return write_double(out, ((const double *)c->values)[j]);
    case K_DECIMAL: return write_decimal(out, c, j, policy);
    case K_STRING: {
        const int64_t start = offset_at(c->values, c->large, j);
        const int64_t end = offset_at(c->values, c->large, j + 1);
        *out++ = '"';
        if (c->escapes)
            out = write_escaped(out, c->data + start, end - start);
        else
            out = put(out, (const char *)c->data + start, (size_t)(end - start));
        *out++ = '"';
        return out;
    }
    case K_BINARY:
    case K_FIXED_BINARY: {
        int64_t start, end;
        if (c->kind == K_FIXED_BINARY) {
            start = j * c->width;
            end = start + c->width;
        } else {
            start = offset_at(c->values, c->large, j);
            end = offset_at(c->values, c->large, j + 1);
        }
        const uint8_t *bytes = c->kind == K_FIXED_BINARY ? (const uint8_t *)c->values : c->data;
        out = PUT(out, "bytes((");
        for (int64_t k = start; k < end; k++) {
            if (k > start) out = PUT(out, ", ");
            const unsigned b = bytes[k];
            if (b >= 100) {
                *out++ = (char)('0' + b / 100);
                out = put(out, DIGITS2 + 2 * (b % 100), 2);
            } else {
                out = write_small(out, b);
            }
        }
        if (end - start == 1) *out++ = ',';
        return PUT(out, "))");
    }
    case K_DATE32:
    case K_DATE64: {
        int64_t day;
        if (c->kind == K_DATE32)
            day = ((const int32_t *)c->values)[j];
        else
            day = floor_div(read_i64(c, j), SECONDS_PER_DAY * 1000);
        if (day < MIN_EPOCH_DAY || day > MAX_EPOCH_DAY) {
            c->out_of_range++;
            return NONE(out);
        }
        out = write_day(out, c, day);
        *out++ = ')';
        return out;
    }
    case K_TIMESTAMP: {
        const int64_t ticks = read_i64(c, j);
        if (ticks < c->lo || ticks > c->hi) {
            c->out_of_range++;
            return NONE(out);
        }
        const int64_t per_day = SECONDS_PER_DAY * c->per_second;
        const int64_t day = floor_div(ticks, per_day);
        out = write_day(out, c, day);
        out = PUT(out, ", hour: ");
        return write_time_of_day(out, (int64_t)floor_rem(ticks, day, per_day) / c->per_second);
    }
    case K_TIME: {
        const int64_t ticks = read_signed(c->values, c->width, j);
        if (ticks < 0 || ticks > c->hi) {
            c->out_of_range++;
            return NONE(out);
        }
        out = PUT(out, "datetime(hour: ");
        return write_time_of_day(out, ticks / c->per_second);
    }
    case K_DURATION: {
        const int64_t ticks = read_i64(c, j);
        if (c->per_second == 1) {
            out = PUT(out, "duration(seconds: ");
            out = write_int(out, ticks);
            *out++ = ')';
            return out;
        }
        const int64_t seconds = floor_div(ticks, c->per_second);
        const int64_t nanos =
            (int64_t)floor_rem(ticks, seconds, c->per_second) * (1000000000 / c->per_second);
        if (nanos) *out++ = '(';
        out = PUT(out, "duration(seconds: ");
        out = write_int(out, seconds);
        *out++ = ')';
        if (!nanos) return out;
        out = PUT(out, " + duration(seconds: 1) / 1000000000 * ");
        out = write_u64(out, (uint64_t)nanos);
        *out++ = ')';
        return out;
    }
    case K_TEXT: {
        const int64_t start = offset_at(c->values, c->large, j);
        const int64_t end = offset_at(c->values, c->large, j + 1);
        return put(out, (const char *)c->data + start, (size_t)(end - start));
    }
    case K_DICT_TEXT: {
        const int64_t k = c->index_signed ? read_signed(c->values, c->width, j)
                                          : (int64_t)read_unsigned(c->values, c->width, j);
        const int64_t d = c->dict_offset + k;
        if (!is_valid(c->dict_validity, d)) return NONE(out);
        const int64_t start = offset_at(c->dict_offsets, c->dict_large, d);
        const int64_t end = offset_at(c->dict_offsets, c->dict_large, d + 1);
        return put(out, (const char *)c->dict_data + start, (size_t)(end - start));
    }
    default: return NONE(out);
    }
}

/* --------------------------------------------------------------- reading the layout */

static int fail(const char *what, const char *format)
{
    PyErr_Format(PyExc_TypeError, "native encoder: %s (Arrow format '%s')", what, format);
    return -1;
}

static int int_width(char f, int *is_signed)
{
    switch (f) {
    case 'c': *is_signed = 1; return 1;
    case 'C': *is_signed = 0; return 1;
    case 's': *is_signed = 1; return 2;
    case 'S': *is_signed = 0; return 2;
    case 'i': *is_signed = 1; return 4;
    case 'I': *is_signed = 0; return 4;
    case 'l': *is_signed = 1; return 8;
    case 'L': *is_signed = 0; return 8;
    default: return 0;
    }
}

static int64_t unit_per_second(char u)
{
    switch (u) {
    case 's': return 1;
    case 'm': return 1000;
    case 'u': return 1000000;
    case 'n': return 1000000000;
    default: return 0;
    }
}

static int need_buffers(const struct ArrowArray *a, int64_t n, const char *format)
{
    if (a->n_buffers != n) return fail("unexpected number of buffers", format);
    for (int64_t i = 1; i < n; i++)
        if (a->buffers[i] == NULL && a->length > 0) return fail("missing buffer", format);
    return 0;
}

/* Fills c from a value column; raw text columns are K_TEXT or K_DICT_TEXT. */
static int describe(Column *c, const struct ArrowSchema *s, const struct ArrowArray *a, int raw)
{
    const char *f = s->format;
    c->offset = a->offset;
    c->validity = a->n_buffers > 0 ? (const uint8_t *)a->buffers[0] : NULL;
    c->memo_len = 0;
    if (raw) {
        if (s->dictionary != NULL) {
            const struct ArrowSchema *ds = s->dictionary;
            const struct ArrowArray *da = a->dictionary;
            c->kind = K_DICT_TEXT;
            c->width = int_width(f[0], &c->index_signed);
            if (!c->width || f[1] || da == NULL) return fail("bad dictionary indices", f);
            if (need_buffers(a, 2, f)) return -1;
            if (strcmp(ds->format, "u") && strcmp(ds->format, "U")) return fail("dictionary of text expected", ds->format);
            if (need_buffers(da, 3, ds->format)) return -1;
            c->values = a->buffers[1];
            c->dict_length = da->length;
            c->dict_offset = da->offset;
            c->dict_validity = (const uint8_t *)da->buffers[0];
            c->dict_offsets = da->buffers[1];
            c->dict_data = (const uint8_t *)da->buffers[2];
            c->dict_large = ds->format[0] == 'U';
            return 0;
        }
        if (strcmp(f, "u") && strcmp(f, "U")) return fail("text expected", f);
        if (need_buffers(a, 3, f)) return -1;
        c->kind = K_TEXT;
        c->large = f[0] == 'U';
        c->values = a->buffers[1];
        c->data = (const uint8_t *)a->buffers[2];
        return 0;
    }
    int is_signed;
    if (s->dictionary != NULL) return fail("a dictionary must come as text", f);
    if (f[0] == 'n' && !f[1]) {
        c->kind = K_NULL;
        return 0;
    }
    if (f[0] == 'b' && !f[1]) {
        c->kind = K_BOOL;
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if (!f[1] && (c->width = int_width(f[0], &is_signed))) {
        c->kind = is_signed ? K_INT : K_UINT;
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if (!strcmp(f, "g")) {
        c->kind = K_FLOAT64;
        c->width = 8;
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if (f[0] == 'd' && f[1] == ':') {
        int precision, scale, bits = 128;
        const int got = sscanf(f + 2, "%d,%d,%d", &precision, &scale, &bits);
        if (got < 2 || scale < 0 || scale > 38 || !(bits == 32 || bits == 64 || bits == 128))
            return fail("unsupported decimal", f);
        c->kind = K_DECIMAL;
        c->precision = precision;
        c->scale = scale;
        c->width = bits / 8;
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if ((f[0] == 'u' || f[0] == 'U' || f[0] == 'z' || f[0] == 'Z') && !f[1]) {
        c->kind = (f[0] == 'u' || f[0] == 'U') ? K_STRING : K_BINARY;
        c->large = f[0] == 'U' || f[0] == 'Z';
        if (need_buffers(a, 3, f)) return -1;
        c->values = a->buffers[1];
        c->data = (const uint8_t *)a->buffers[2];
        return 0;
    }
    if (f[0] == 'w' && f[1] == ':') {
        c->kind = K_FIXED_BINARY;
        c->width = atoi(f + 2);
        if (c->width <= 0) return fail("bad fixed-size binary width", f);
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if (!strcmp(f, "tdD") || !strcmp(f, "tdm")) {
        c->kind = f[2] == 'D' ? K_DATE32 : K_DATE64;
        c->width = f[2] == 'D' ? 4 : 8;
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if (f[0] == 't' && f[1] == 's' && f[2] && f[3] == ':') {
        if (f[4]) return fail("zoned timestamps come here as local time", f);
        c->kind = K_TIMESTAMP;
        c->width = 8;
        c->per_second = unit_per_second(f[2]);
        if (!c->per_second) return fail("bad unit", f);
        const __int128 per_day = (__int128)SECONDS_PER_DAY * c->per_second;
        const __int128 lo = MIN_EPOCH_DAY * per_day, hi = (MAX_EPOCH_DAY + 1) * per_day - 1;
        c->lo = lo < INT64_MIN ? INT64_MIN : (int64_t)lo;
        c->hi = hi > INT64_MAX ? INT64_MAX : (int64_t)hi;
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if (f[0] == 't' && f[1] == 't' && f[2] && !f[3]) {
        c->kind = K_TIME;
        c->per_second = unit_per_second(f[2]);
        if (!c->per_second) return fail("bad unit", f);
        c->width = (f[2] == 's' || f[2] == 'm') ? 4 : 8;
        c->hi = SECONDS_PER_DAY * c->per_second - 1;
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    if (f[0] == 't' && f[1] == 'D' && f[2] && !f[3]) {
        c->kind = K_DURATION;
        c->width = 8;
        c->per_second = unit_per_second(f[2]);
        if (!c->per_second) return fail("bad unit", f);
        if (need_buffers(a, 2, f)) return -1;
        c->values = a->buffers[1];
        return 0;
    }
    return fail("type the native encoder does not take", f);
}

/* ------------------------------------------------------- checking against the buffers */

/* The byte sizes of an array's buffers (and of its dictionary's), from Python: the C
   data interface gives pointers only. */
#define MAX_BUFFERS 3
typedef struct {
    int64_t array[MAX_BUFFERS];
    int64_t dictionary[MAX_BUFFERS];
} BufferSizes;

/* Whether count elements of width bytes fit size bytes (no overflow on the way). */
static inline int fits(int64_t count, int64_t width, int64_t size)
{
    int64_t bytes;
    return count >= 0 && !__builtin_mul_overflow(count, width, &bytes) && bytes <= size;
}

static int too_small(const char *what)
{
    PyErr_Format(PyExc_ValueError, "native encoder: %s is shorter than the array needs", what);
    return -1;
}

/* Offsets [first, first + count] must fit their buffer, start at 0 or more, never go
   down, and end within the data buffer. */
static int check_offsets(const void *offsets, int large, int64_t first, int64_t count,
                         int64_t offsets_size, int64_t data_size)
{
    const int64_t width = large ? 8 : 4;
    if (first > INT64_MAX - count - 1 || !fits(first + count + 1, width, offsets_size))
        return too_small("an offsets buffer");
    int64_t previous = offset_at(offsets, large, first);
    if (previous < 0) {
        PyErr_SetString(PyExc_ValueError, "native encoder: a negative offset");
        return -1;
    }
    for (int64_t i = first + 1; i <= first + count; i++) {
        const int64_t next = offset_at(offsets, large, i);
        if (next < previous) {
            PyErr_SetString(PyExc_ValueError, "native encoder: offsets go down");
            return -1;
        }
        previous = next;
    }
    return previous > data_size ? too_small("a data buffer") : 0;
}

/* Every offset, length and index column c reads for rows [0, n) lies in its buffers. */
static int check_layout(const Column *c, int64_t n, const BufferSizes *sizes)
{
    if (c->offset < 0 || n < 0 || c->offset > INT64_MAX - n - 8) return too_small("an array");
    const int64_t end = c->offset + n; /* elements of the array the rows reach */
    if (c->kind == K_NULL) return 0;
    if (c->validity != NULL && (end + 7) / 8 > sizes->array[0]) return too_small("a validity bitmap");
    switch (c->kind) {
    case K_BOOL: return (end + 7) / 8 > sizes->array[1] ? too_small("a bitmap") : 0;
    case K_STRING:
    case K_BINARY:
    case K_TEXT: return check_offsets(c->values, c->large, c->offset, n, sizes->array[1], sizes->array[2]);
    case K_DICT_TEXT: {
        if (!fits(end, c->width, sizes->array[1])) return too_small("an indices buffer");
        if (c->dict_offset < 0 || c->dict_length < 0 || c->dict_offset > INT64_MAX - c->dict_length - 8)
            return too_small("a dictionary");
        if (c->dict_validity != NULL && (c->dict_offset + c->dict_length + 7) / 8 > sizes->dictionary[0])
            return too_small("a dictionary's validity bitmap");
        return check_offsets(c->dict_offsets, c->dict_large, c->dict_offset, c->dict_length,
                             sizes->dictionary[1], sizes->dictionary[2]);
    }
    default: /* fixed width: integers, floats, decimals, binaries, dates and times */
        return fits(end, c->width, sizes->array[1]) ? 0 : too_small("a values buffer");
    }
}

/* ---------------------------------------------------------------- the output buffer */

/* One freed output block is kept for the next call: a transformer encodes batch after
   batch of about the same size, and fresh pages would cost a page fault each. Only
   touched with the GIL held. */
#define SPARE_MAX ((size_t)32 << 20)
static char *spare_block = NULL;
static size_t spare_capacity = 0;

static char *take_block(size_t size, size_t *capacity)
{
    /* not for a result far smaller (a dictionary's text), which would hold it */
    if (spare_block != NULL && spare_capacity >= size && spare_capacity / 4 <= size) {
        char *block = spare_block;
        *capacity = spare_capacity;
        spare_block = NULL;
        return block;
    }
    *capacity = size;
    return malloc(size);
}

/* capacity 0: a block that is never kept. */
static void give_block(char *block, size_t capacity)
{
    if (block == NULL) return;
    if (capacity > 0 && capacity <= SPARE_MAX && (spare_block == NULL || spare_capacity < capacity)) {
        free(spare_block);
        spare_block = block;
        spare_capacity = capacity;
    } else {
        free(block);
    }
}

typedef struct {
    PyObject_HEAD char *data;
    Py_ssize_t size;
    size_t capacity;
} Buffer;

static void buffer_dealloc(Buffer *self)
{
    give_block(self->data, self->capacity);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int buffer_get(Buffer *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size, 1, flags);
}

static PyBufferProcs buffer_procs = {(getbufferproc)buffer_get, NULL};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ashstream._encoder.Buffer",
    .tp_basicsize = sizeof(Buffer),
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_as_buffer = &buffer_procs,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bytes written by the native encoder (read-only, zero-copy).",
};

static PyObject *new_buffer(char *data, Py_ssize_t size, size_t capacity)
{
    Buffer *b = PyObject_New(Buffer, &BufferType);
    if (b == NULL) {
        give_block(data, capacity);
        return NULL;
    }
    b->data = data;
    b->size = size;
    b->capacity = capacity;
    return (PyObject *)b;
}

/* ----------------------------------------------------------------------- sizing */

static int add_size(size_t *total, size_t a, size_t b) /* total += a * b */
{
    size_t product;
    if (__builtin_mul_overflow(a, b, &product) || __builtin_add_overflow(*total, product, total))
        return -1;
    return 0;
}

/* An upper bound of the bytes column c writes for rows [0, n). */
static int column_bound(Column *c, int64_t n, size_t *total)
{
    const size_t rows = (size_t)n;
    const int64_t first = c->offset, last = c->offset + n;
    switch (c->kind) {
    case K_STRING: {
        /* quotes (or none) per row, and each byte with its escape */
        const int64_t start = offset_at(c->values, c->large, first);
        const int64_t end = offset_at(c->values, c->large, last);
        size_t bytes = 0;
        for (int64_t k = start; k < end; k++) bytes += ESCAPE_LEN[c->data[k]] ? 6 : 1;
        c->escapes = bytes != (size_t)(end - start);
        return add_size(total, rows, 4) || add_size(total, bytes, 1);
    }
    case K_BINARY:
    case K_FIXED_BINARY: {
        size_t bytes = c->kind == K_FIXED_BINARY
                           ? rows * (size_t)c->width
                           : (size_t)(offset_at(c->values, c->large, last) -
                                      offset_at(c->values, c->large, first));
        return add_size(total, rows, 16) || add_size(total, bytes, 5);
    }
    case K_TEXT: {
        const size_t bytes = (size_t)(offset_at(c->values, c->large, last) -
                                      offset_at(c->values, c->large, first));
        return add_size(total, rows, 4) || add_size(total, bytes, 1);
    }
    case K_DICT_TEXT: {
        int64_t longest = 4;
        for (int64_t d = c->dict_offset; d < c->dict_offset + c->dict_length; d++) {
            const int64_t len = offset_at(c->dict_offsets, c->dict_large, d + 1) -
                                offset_at(c->dict_offsets, c->dict_large, d);
            if (len > longest) longest = len;
        }
        return add_size(total, rows, (size_t)longest);
    }
    default: return add_size(total, rows, MAX_VALUE_BYTES[c->kind]);
    }
}

static int check_indices(const Column *c, int64_t n)
{
    for (int64_t j = c->offset; j < c->offset + n; j++) {
        if (!is_valid(c->validity, j)) continue;
        const int64_t k = c->index_signed ? read_signed(c->values, c->width, j)
                                          : (int64_t)read_unsigned(c->values, c->width, j);
        if (k < 0 || k >= c->dict_length) {
            PyErr_Format(PyExc_IndexError, "native encoder: dictionary index %lld out of range", (long long)k);
            return -1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------- encode_rows */

PyDoc_STRVAR(encode_rows_doc,
             "encode_rows(columns, close, length, decimal_policy) -> (text, ends, counts)\n\n"
             "columns: a list of (schema capsule, array capsule, raw, prefix bytes, the byte sizes\n"
             "of the array's 3 buffers, of its dictionary's 3). Each row is\n"
             "written as prefix_1 value_1 ... close. ends: int64 row ends (length + 1, from 0).\n"
             "counts: (out_of_range, decimals_over) per column. decimal_policy: 0 writes a\n"
             "decimal beyond Typst's range as float(\"...\"), 1 as a string.");

static PyObject *encode_rows(PyObject *self, PyObject *args)
{
    PyObject *specs;
    const char *close;
    Py_ssize_t close_len, length;
    int policy;
    if (!PyArg_ParseTuple(args, "O!y#ni", &PyList_Type, &specs, &close, &close_len, &length, &policy))
        return NULL;
    if (length < 0) return PyErr_Format(PyExc_ValueError, "negative length");
    const Py_ssize_t ncols = PyList_GET_SIZE(specs);
    Column *cols = calloc((size_t)(ncols ? ncols : 1), sizeof(Column));
    if (cols == NULL) return PyErr_NoMemory();
    PyObject *result = NULL;
    char *text = NULL;
    int64_t *ends = NULL;
    size_t bound = 0, capacity = 0;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *spec = PyList_GET_ITEM(specs, k);
        PyObject *schema_capsule, *array_capsule;
        int raw;
        const char *prefix;
        Py_ssize_t prefix_len;
        BufferSizes sizes = {{0, 0, 0}, {0, 0, 0}};
        if (!PyArg_ParseTuple(spec, "OOpy#(LLL)(LLL)", &schema_capsule, &array_capsule, &raw, &prefix,
                              &prefix_len, &sizes.array[0], &sizes.array[1], &sizes.array[2],
                              &sizes.dictionary[0], &sizes.dictionary[1], &sizes.dictionary[2]))
            goto done;
        const struct ArrowSchema *s = PyCapsule_GetPointer(schema_capsule, "arrow_schema");
        const struct ArrowArray *a = PyCapsule_GetPointer(array_capsule, "arrow_array");
        if (s == NULL || a == NULL) goto done;
        if (a->release == NULL || s->release == NULL) {
            PyErr_SetString(PyExc_ValueError, "native encoder: a released Arrow array");
            goto done;
        }
        if (a->length != length) {
            PyErr_Format(PyExc_ValueError, "native encoder: column %zd has %lld rows, not %zd", k,
                         (long long)a->length, length);
            goto done;
        }
        Column *c = &cols[k];
        if (describe(c, s, a, raw) || check_layout(c, length, &sizes)) goto done;
        if (c->kind == K_DICT_TEXT && check_indices(c, length)) goto done;
        c->prefix = prefix;
        c->prefix_len = (size_t)prefix_len;
        if (c->prefix_len <= sizeof(c->short_prefix)) memcpy(c->short_prefix, prefix, c->prefix_len);
        if (column_bound(c, length, &bound) || add_size(&bound, (size_t)length, (size_t)prefix_len)) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (add_size(&bound, (size_t)length, (size_t)close_len) || add_size(&bound, 1, SLACK)) {
        PyErr_NoMemory();
        goto done;
    }
    text = take_block(bound, &capacity);
    ends = malloc(((size_t)length + 1) * sizeof(int64_t));
    if (text == NULL || ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    char *out = text;
    Py_BEGIN_ALLOW_THREADS;
    ends[0] = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        for (Py_ssize_t k = 0; k < ncols; k++) {
            Column *c = &cols[k];
            if (c->prefix_len <= sizeof(c->short_prefix)) {
                memcpy(out, c->short_prefix, sizeof(c->short_prefix));
                out += c->prefix_len;
            } else {
                out = put(out, c->prefix, c->prefix_len);
            }
            out = write_value(out, c, c->offset + i, policy);
        }
        out = put(out, close, (size_t)close_len);
        ends[i + 1] = out - text;
    }
    Py_END_ALLOW_THREADS;
    const size_t used = (size_t)(out - text);
    if (used > bound - SLACK) Py_FatalError("ashstream._encoder: output bound exceeded");
    PyObject *counts = PyList_New(ncols);
    if (counts == NULL) goto done;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        PyObject *pair = Py_BuildValue("(LL)", (long long)cols[k].out_of_range, (long long)cols[k].decimals_over);
        if (pair == NULL) {
            Py_DECREF(counts);
            goto done;
        }
        PyList_SET_ITEM(counts, k, pair);
    }
    PyObject *text_obj = new_buffer(text, (Py_ssize_t)used, capacity);
    text = NULL;
    const size_t ends_size = ((size_t)length + 1) * sizeof(int64_t);
    PyObject *ends_obj = new_buffer((char *)ends, (Py_ssize_t)ends_size, 0); /* not kept */
    ends = NULL;
    if (text_obj && ends_obj) result = Py_BuildValue("(OOO)", text_obj, ends_obj, counts);
    Py_XDECREF(text_obj);
    Py_XDECREF(ends_obj);
    Py_DECREF(counts);
done:
    give_block(text, capacity);
    free(ends);
    free(cols);
    return result;
}

PyDoc_STRVAR(format_double_doc, "format_double(x) -> str: x as the encoder writes a float64.");

static PyObject *format_double(PyObject *self, PyObject *arg)
{
    const double v = PyFloat_AsDouble(arg);
    if (v == -1.0 && PyErr_Occurred()) return NULL;
    char buf[64];
    char *end = write_double(buf, v);
    return PyUnicode_FromStringAndSize(buf, end - buf);
}

static PyMethodDef methods[] = {
    {"encode_rows", encode_rows, METH_VARARGS, encode_rows_doc},
    {"format_double", format_double, METH_O, format_double_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ashstream._encoder",
    "The compiled twin of ashstream.encode's row join (see ashstream/_native/encoder.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__encoder(void)
{
    init_escapes();
    if (PyType_Ready(&BufferType) < 0) return NULL;
    return PyModule_Create(&module);
}
