/* ashstream._checksum: zlib's CRC-32, folded with carry-less multiplication.
 *
 * The cache checks every byte of the text it reuses and checksums every byte a run
 * writes (ashstream/checksum.py). zlib's table-driven crc32 runs at ~2 GB/s, which made
 * checksums a tenth of a cold run and most of a re-run that changed nothing. On x86-64
 * with PCLMULQDQ this folds 64 bytes a step, several times faster, giving exactly
 * zlib.crc32's value (the tests compare them): zlib.crc32 stays the reference, used
 * where this is not built or the CPU lacks the instructions.
 *
 * The folding is Intel's "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
 * Instruction" (Gopal et al., 2009), with the bit-reflected constants of its appendix for
 * the CRC-32 polynomial, as in Chromium's zlib (crc32_simd.c).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_CLMUL_CRC 1
#include <immintrin.h>

#define CLMUL __attribute__((target("sse4.1,pclmul")))

/* The CRC register of bytes, bit by bit (the few after the last 16-byte block). */
static uint32_t crc_bytes(uint32_t crc, const unsigned char *buf, size_t len)
{
    while (len--) {
        crc ^= *buf++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return crc;
}

/* The CRC register after len bytes (len >= 64, a multiple of 16), from register crc. */
CLMUL static uint32_t crc_fold(uint32_t crc, const unsigned char *buf, size_t len)
{
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596, 0x0154442bd4);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124);
    const __m128i poly = _mm_set_epi64x(0x01f7011641, 0x01db710641);
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
    __m128i x1, x2, x3, x4, x5, x6, x7, x8;

    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    buf += 64;
    len -= 64;

    /* four lanes of 16 bytes, each folded 64 bytes ahead */
    while (len >= 64) {
        x5 = _mm_clmulepi64_si128(x1, k1k2, 0x00);
        x6 = _mm_clmulepi64_si128(x2, k1k2, 0x00);
        x7 = _mm_clmulepi64_si128(x3, k1k2, 0x00);
        x8 = _mm_clmulepi64_si128(x4, k1k2, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k1k2, 0x11);
        x2 = _mm_clmulepi64_si128(x2, k1k2, 0x11);
        x3 = _mm_clmulepi64_si128(x3, k1k2, 0x11);
        x4 = _mm_clmulepi64_si128(x4, k1k2, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(buf + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(buf + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(buf + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(buf + 0x30)));
        buf += 64;
        len -= 64;
    }

    /* the four lanes into one */
    x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
    x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
    x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
    x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);

    /* the 16-byte blocks left */
    while (len >= 16) {
        x5 = _mm_clmulepi64_si128(x1, k3k4, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k3k4, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)buf));
        buf += 16;
        len -= 16;
    }

    /* 128 bits to 64 */
    x2 = _mm_clmulepi64_si128(x1, k3k4, 0x10);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, low32);
    x1 = _mm_clmulepi64_si128(x1, k5k0, 0x00);
    x1 = _mm_xor_si128(x1, x2);

    /* Barrett reduction to 32 bits */
    x2 = _mm_and_si128(x1, low32);
    x2 = _mm_clmulepi64_si128(x2, poly, 0x10);
    x2 = _mm_and_si128(x2, low32);
    x2 = _mm_clmulepi64_si128(x2, poly, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

static int cpu_has_clmul(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}

/* zlib.crc32(data, value) */
static uint32_t crc32_of(uint32_t value, const unsigned char *buf, size_t len)
{
    uint32_t crc = ~value;
    if (len >= 64) {
        size_t folded = len & ~(size_t)15;
        crc = crc_fold(crc, buf, folded);
        buf += folded;
        len -= folded;
    }
    return ~crc_bytes(crc, buf, len);
}
#endif

PyDoc_STRVAR(crc32_doc,
"crc32(data, value=0, /)\n--\n\n"
"zlib.crc32(data, value), several times faster; the GIL is released while it runs.\n"
"Only where available() is true.");

static PyObject *crc32(PyObject *self, PyObject *args)
{
#ifdef HAVE_CLMUL_CRC
    Py_buffer data;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I:crc32", &data, &value))
        return NULL;
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS
    crc = crc32_of((uint32_t)value, (const unsigned char *)data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
#else
    PyErr_SetString(PyExc_NotImplementedError, "no carry-less multiply on this build");
    return NULL;
#endif
}

PyDoc_STRVAR(available_doc,
"available()\n--\n\n"
"Whether crc32 runs here: built for x86-64 and the CPU has PCLMULQDQ and SSE4.1.");

static PyObject *available(PyObject *self, PyObject *unused)
{
#ifdef HAVE_CLMUL_CRC
    return PyBool_FromLong(cpu_has_clmul());
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"crc32", crc32, METH_VARARGS, crc32_doc},
    {"available", available, METH_NOARGS, available_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ashstream._checksum",
    "zlib's CRC-32 with carry-less multiplication (see ashstream/checksum.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__checksum(void)
{
    return PyModule_Create(&module);
}
