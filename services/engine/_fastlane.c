/* The engine's fast lane in C (decision 011): the per-request work of one plain search that was Python.

   parse_single(body, dim, out, max_top_k) -> (top_k, ef, nprobe, include_metadata, include_vectors) | None
       Parses the plainest search body: a JSON object with "vector" (exactly ``dim`` numbers) and at most
       "top_k", "params" ({"ef", "nprobe"} or null), "include_metadata", "include_vectors". The numbers are
       written to ``out`` (a writable float32 buffer of ``dim`` items) as float32 (parsed as correctly rounded
       doubles, as simdjson and orjson do, then rounded to float32). Returns None for anything else, anything
       doubtful or anything invalid: duplicate keys, escapes, other keys or types, numbers beyond float32, an
       integer out of range. The caller then serves the body on the usual path, which names any error. The
       whole parse runs without the GIL.

   unit_rows(x, n, d) -> bool
       Scales each row of a C-contiguous float32 (n, d) buffer to unit length in place, in double precision:
       x[i] / sqrt(sum of x[i]^2). False (and x unchanged) if a row has length zero or not finite. Both search
       paths normalize cosine queries with it, so they agree bit for bit.

   hits(dist, labels, k, n, blob, offsets) -> list[dict] | None
       The results of one query: ``{"id": ..., "score": ...}`` for each of the first ``k`` (float32 score,
       int64 row) pairs whose row is in [0, n) and whose score is finite, the id read from a packed UTF-8 blob
       and its int64 end offsets (``idmap.PackedIds``). None if a row is out of range. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *p;
    const char *end;
} cursor;

static inline void skip_ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static inline int expect(cursor *c, char ch) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

static inline int is_digit(char ch) { return ch >= '0' && ch <= '9'; }

/* A JSON string without escapes or control characters: its contents in [*s, *s + *len). */
static int read_key(cursor *c, const char **s, Py_ssize_t *len) {
    skip_ws(c);
    if (c->p >= c->end || *c->p != '"') return 0;
    const char *start = ++c->p;
    while (c->p < c->end && *c->p != '"') {
        unsigned char ch = (unsigned char)*c->p;
        if (ch == '\\' || ch < 0x20) return 0;
        c->p++;
    }
    if (c->p >= c->end) return 0;
    *s = start;
    *len = c->p - start;
    c->p++;
    return 1;
}

/* The extent of a JSON number at the cursor (RFC 8259 grammar); sets *is_int when it has no fraction or
   exponent. 0 if there is none. */
static int number_span(cursor *c, const char **start, const char **stop, int *is_int) {
    skip_ws(c);
    const char *p = c->p, *e = c->end, *s = p;
    *is_int = 1;
    if (p < e && *p == '-') p++;
    if (p >= e) return 0;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < e && is_digit(*p)) p++;
    } else {
        return 0;
    }
    if (p < e && *p == '.') {
        *is_int = 0;
        p++;
        if (p >= e || !is_digit(*p)) return 0;
        while (p < e && is_digit(*p)) p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        *is_int = 0;
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        if (p >= e || !is_digit(*p)) return 0;
        while (p < e && is_digit(*p)) p++;
    }
    *start = s;
    *stop = p;
    c->p = p;
    return 1;
}

/* A double from a validated JSON number span: strtod (correctly rounded in glibc) on a NUL-terminated copy. */
static int span_to_double(const char *s, const char *e, double *out) {
    char buf[64];
    Py_ssize_t n = e - s;
    char *tmp = buf;
    if (n >= (Py_ssize_t)sizeof(buf)) {
        tmp = malloc((size_t)n + 1);
        if (tmp == NULL) return 0;
    }
    memcpy(tmp, s, (size_t)n);
    tmp[n] = '\0';
    char *endp = NULL;
    double v = strtod(tmp, &endp);
    int ok = endp == tmp + n;
    if (tmp != buf) free(tmp);
    *out = v;
    return ok;
}

static const double POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                  1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define SWAR_DIGITS 1
/* Eight ASCII digits at p (fast_float's SWAR tests; little-endian loads). */
static inline int eight_digits(const char *p) {
    uint64_t val;
    memcpy(&val, p, 8);
    return (((val & 0xF0F0F0F0F0F0F0F0ULL) | (((val + 0x0606060606060606ULL) & 0xF0F0F0F0F0F0F0F0ULL) >> 4)) ==
            0x3333333333333333ULL);
}

static inline uint32_t parse_eight(const char *p) {
    uint64_t val;
    memcpy(&val, p, 8);
    val -= 0x3030303030303030ULL;
    val = (val * 10) + (val >> 8);
    val = (((val & 0x000000FF000000FFULL) * 0x000F424000000064ULL) +
           (((val >> 16) & 0x000000FF000000FFULL) * 0x0000271000000001ULL)) >>
          32;
    return (uint32_t)val;
}
#else
#define SWAR_DIGITS 0
#endif

/* A JSON number (RFC 8259 grammar) at the cursor as float32(correctly rounded double), the way the Python parsers
   give it, in one pass and without strtod's cost in the common case. The first 19 significant digits w and the
   decimal exponent e give d = w * 10^e in at most two exact-power steps (powers up to 10^22 are exact doubles), so
   d is within 4 ulps of the correctly rounded double c (digits beyond the 19th move it by less than 0.01 ulp).
   float32(d) == float32(c) unless a float32 rounding boundary (a midpoint between two float32 values) lies that
   close to d: then, and for |e| > 44 or float32 subnormals, strtod decides. *v gets the double for the sum of
   squares. */
static int read_number(cursor *c, float *out, double *v) {
    skip_ws(c);
    const char *s = c->p, *p = s, *e = c->end;
    int neg = 0;
    if (p < e && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= e) return 0;
    uint64_t w = 0;
    int nd = 0, exp10 = 0; /* nd: significant digits taken into w */
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        for (; p < e && is_digit(*p); p++) {
            if (nd < 19) {
                w = w * 10 + (uint64_t)(*p - '0');
                nd++;
            } else {
                exp10++;
            }
        }
    } else {
        return 0;
    }
    if (p < e && *p == '.') {
        p++;
        if (p >= e || !is_digit(*p)) return 0;
        if (nd == 0) /* 0.000ddd: the zeros are not significant */
            for (; p < e && *p == '0'; p++) exp10--;
#if SWAR_DIGITS
        while (nd <= 11 && e - p >= 8 && eight_digits(p)) {
            w = w * 100000000ULL + parse_eight(p);
            nd += 8;
            exp10 -= 8;
            p += 8;
        }
#endif
        for (; p < e && is_digit(*p); p++) {
            if (nd < 19) {
                w = w * 10 + (uint64_t)(*p - '0');
                nd++;
                exp10--;
            }
        }
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        int eneg = 0, ev = 0, en = 0;
        if (p < e && (*p == '+' || *p == '-')) eneg = *p++ == '-';
        if (p >= e || !is_digit(*p)) return 0;
        for (; p < e && is_digit(*p); p++, en++)
            if (en < 6) ev = ev * 10 + (*p - '0');
        exp10 += eneg ? -ev : ev;
        if (en > 4) goto slow;
    }
    c->p = p;
    double d = (double)w;
    if (w != 0) {
        if (exp10 < -44 || exp10 > 44) goto slow;
        int a = exp10 < 0 ? -exp10 : exp10;
        if (a > 22) {
            d = exp10 < 0 ? d / 1e22 : d * 1e22;
            a -= 22;
        }
        d = exp10 < 0 ? d / POW10[a] : d * POW10[a];
        if (!(d >= 0x1p-126)) goto slow; /* float32 subnormal: rounded at a different granularity */
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        int64_t low = (int64_t)(bits & ((1ULL << 29) - 1)); /* the 29 bits below float32's precision */
        if (low > (1LL << 28) - 16 && low < (1LL << 28) + 16) goto slow;
    }
    *v = neg ? -d : d;
    *out = (float)*v;
    return 1;
slow:
    c->p = p;
    if (!span_to_double(s, p, v)) return 0;
    *out = (float)*v;
    return 1;
}

/* A JSON integer literal in [lo, hi]. */
static int read_int(cursor *c, long lo, long hi, long *out) {
    const char *s, *e;
    int is_int;
    if (!number_span(c, &s, &e, &is_int) || !is_int || e - s > 12) return 0;
    long v = strtol(s, NULL, 10);
    if (v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

static int read_literal(cursor *c, const char *word) {
    skip_ws(c);
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return 0;
    c->p += n;
    return 1;
}

static int read_bool(cursor *c, int *out) {
    if (read_literal(c, "true")) {
        *out = 1;
        return 1;
    }
    if (read_literal(c, "false")) {
        *out = 0;
        return 1;
    }
    return 0;
}

static int key_is(const char *s, Py_ssize_t len, const char *word) {
    return (size_t)len == strlen(word) && memcmp(s, word, (size_t)len) == 0;
}

/* "params": null, or an object of "ef"/"nprobe", each an integer in [1, 65536] or null. */
static int read_params(cursor *c, long *ef, long *nprobe) {
    if (read_literal(c, "null")) return 1;
    if (!expect(c, '{')) return 0;
    int seen_ef = 0, seen_np = 0;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 1;
    }
    for (;;) {
        const char *k;
        Py_ssize_t kl;
        if (!read_key(c, &k, &kl) || !expect(c, ':')) return 0;
        long *slot;
        if (key_is(k, kl, "ef")) {
            if (seen_ef++) return 0;
            slot = ef;
        } else if (key_is(k, kl, "nprobe")) {
            if (seen_np++) return 0;
            slot = nprobe;
        } else {
            return 0;
        }
        if (!read_literal(c, "null") && !read_int(c, 1, 65536, slot)) return 0;
        if (expect(c, ',')) continue;
        return expect(c, '}');
    }
}

/* The vector: exactly dim numbers, each finite in float32; the sum of their squares below 1e76 as the Python
   parser requires (so every component is far inside float32's range). */
static int read_vector(cursor *c, Py_ssize_t dim, float *out) {
    if (!expect(c, '[')) return 0;
    double sq = 0.0;
    for (Py_ssize_t i = 0; i < dim; i++) {
        double v;
        if (i > 0 && !expect(c, ',')) return 0;
        if (!read_number(c, out + i, &v)) return 0;
        sq += v * v;
    }
    if (!(sq < 1e76)) return 0; /* NaN-safe: inf or huge sums decline */
    return expect(c, ']');
}

static PyObject *parse_single(PyObject *self, PyObject *args) {
    Py_buffer body, out;
    Py_ssize_t dim, max_top_k;
    if (!PyArg_ParseTuple(args, "y*nw*n", &body, &dim, &out, &max_top_k)) return NULL;
    if (dim < 1 || out.len < dim * (Py_ssize_t)sizeof(float)) {
        PyBuffer_Release(&body);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "out must hold dim float32 values");
        return NULL;
    }
    long top_k = 10, ef = -1, nprobe = -1;
    int inc_m = 0, inc_v = 0, ok = 0;
    Py_BEGIN_ALLOW_THREADS;
    cursor c = {(const char *)body.buf, (const char *)body.buf + body.len};
    int seen_vec = 0, seen_k = 0, seen_p = 0, seen_m = 0, seen_v = 0;
    if (expect(&c, '{')) {
        for (;;) {
            const char *k;
            Py_ssize_t kl;
            if (!read_key(&c, &k, &kl) || !expect(&c, ':')) break;
            int good;
            if (key_is(k, kl, "vector")) {
                good = !seen_vec++ && read_vector(&c, dim, (float *)out.buf);
            } else if (key_is(k, kl, "top_k")) {
                good = !seen_k++ && read_int(&c, 1, (long)max_top_k, &top_k);
            } else if (key_is(k, kl, "params")) {
                good = !seen_p++ && read_params(&c, &ef, &nprobe);
            } else if (key_is(k, kl, "include_metadata")) {
                good = !seen_m++ && read_bool(&c, &inc_m);
            } else if (key_is(k, kl, "include_vectors")) {
                good = !seen_v++ && read_bool(&c, &inc_v);
            } else {
                good = 0;
            }
            if (!good) break;
            if (expect(&c, ',')) continue;
            if (expect(&c, '}')) {
                skip_ws(&c);
                ok = seen_vec && c.p == c.end;
            }
            break;
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&body);
    PyBuffer_Release(&out);
    if (!ok) Py_RETURN_NONE;
    PyObject *efo = ef < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(ef);
    PyObject *npo = nprobe < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(nprobe);
    return Py_BuildValue("(lNNOO)", top_k, efo, npo, inc_m ? Py_True : Py_False, inc_v ? Py_True : Py_False);
}

static PyObject *unit_rows(PyObject *self, PyObject *args) {
    Py_buffer x;
    Py_ssize_t n, d;
    if (!PyArg_ParseTuple(args, "w*nn", &x, &n, &d)) return NULL;
    if (n < 0 || d < 1 || x.len < n * d * (Py_ssize_t)sizeof(float)) {
        PyBuffer_Release(&x);
        PyErr_SetString(PyExc_ValueError, "x must hold n * d float32 values");
        return NULL;
    }
    float *v = (float *)x.buf;
    int ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        double s = 0.0;
        for (Py_ssize_t j = 0; j < d; j++) s += (double)v[i * d + j] * (double)v[i * d + j];
        ok = s > 0.0 && isfinite(s);
    }
    if (ok) {
        for (Py_ssize_t i = 0; i < n; i++) {
            float *row = v + i * d;
            double s = 0.0;
            for (Py_ssize_t j = 0; j < d; j++) s += (double)row[j] * (double)row[j];
            double norm = sqrt(s);
            for (Py_ssize_t j = 0; j < d; j++) row[j] = (float)((double)row[j] / norm);
        }
    }
    PyBuffer_Release(&x);
    return PyBool_FromLong(ok);
}

static PyObject *str_id, *str_score;

static PyObject *hits(PyObject *self, PyObject *args) {
    Py_buffer dist, lab, blob, offs;
    Py_ssize_t k, n;
    if (!PyArg_ParseTuple(args, "y*y*nny*y*", &dist, &lab, &k, &n, &blob, &offs)) return NULL;
    PyObject *out = NULL;
    const float *dv = (const float *)dist.buf;
    const int64_t *lv = (const int64_t *)lab.buf;
    const int64_t *ov = (const int64_t *)offs.buf;
    const char *bv = (const char *)blob.buf;
    Py_ssize_t n_offs = offs.len / (Py_ssize_t)sizeof(int64_t);
    if (k < 0 || dist.len < k * (Py_ssize_t)sizeof(float) || lab.len < k * (Py_ssize_t)sizeof(int64_t) ||
        n < 0 || n_offs < n + 1) {
        PyErr_SetString(PyExc_ValueError, "buffers too small for k results over n ids");
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < k; i++) {
        int64_t r = lv[i];
        float s = dv[i];
        if (r < 0 || !isfinite(s)) continue;
        if (r >= n || ov[r] < 0 || ov[r] > ov[r + 1] || ov[r + 1] > blob.len) {
            Py_CLEAR(out);
            out = Py_NewRef(Py_None);
            goto done;
        }
        PyObject *id = PyUnicode_DecodeUTF8(bv + ov[r], (Py_ssize_t)(ov[r + 1] - ov[r]), "strict");
        PyObject *score = id ? PyFloat_FromDouble((double)s) : NULL;
        PyObject *rec = score ? PyDict_New() : NULL;
        int bad = rec == NULL || PyDict_SetItem(rec, str_id, id) < 0 || PyDict_SetItem(rec, str_score, score) < 0 ||
                  PyList_Append(out, rec) < 0;
        Py_XDECREF(id);
        Py_XDECREF(score);
        Py_XDECREF(rec);
        if (bad) {
            Py_CLEAR(out);
            goto done;
        }
    }
done:
    PyBuffer_Release(&dist);
    PyBuffer_Release(&lab);
    PyBuffer_Release(&blob);
    PyBuffer_Release(&offs);
    return out;
}

static PyMethodDef methods[] = {
    {"parse_single", parse_single, METH_VARARGS, "Parse the plainest search body (see the module's source)."},
    {"unit_rows", unit_rows, METH_VARARGS, "Normalize float32 rows in place, in double precision."},
    {"hits", hits, METH_VARARGS, "One query's results as {id, score} dicts."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastlane", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastlane(void) {
    str_id = PyUnicode_InternFromString("id");
    str_score = PyUnicode_InternFromString("score");
    if (str_id == NULL || str_score == NULL) return NULL;
    return PyModule_Create(&module);
}
