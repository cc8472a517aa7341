/* Shared helpers of the fast-path sources (not part of the Python API). */
#ifndef SF_INTERNAL_H
#define SF_INTERNAL_H

#include "slicefab_fast.h"

/* Record why a call failed and return its status. err may be NULL (the C tests pass one
 * always; Python always passes one). */
static inline int sf_fail(sf_error *err, int code, int field, int64_t index, int64_t value,
                          int64_t limit) {
    if (err) {
        err->code = code;
        err->field = field;
        err->index = index;
        err->value = value;
        err->limit = limit;
        err->extra = 0;
    }
    return code;
}

static inline int sf_ok(sf_error *err) {
    if (err) {
        err->code = SF_OK;
        err->field = SF_F_NONE;
        err->index = -1;
        err->value = 0;
        err->limit = 0;
        err->extra = 0;
    }
    return SF_OK;
}

#endif
