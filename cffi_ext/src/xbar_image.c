/* Slice table -> per-port demand -> crossbar register image -> minimal write list.
 *
 * The C twin of firmware/fabric/image.py (the reference, which documents the formulas).
 * Every register address, field position, width and reset value comes from slicefab_xbar.h,
 * generated from rtl/regmap/slicefab_xbar.rdl: the register layout has one source.
 * All arithmetic is on unsigned 64-bit integers with inputs bounded so that nothing
 * overflows (the bounds are checked first and reported through sf_error).
 */
#include <stddef.h>
#include <string.h>

#include "sf_internal.h"
#include "slicefab_xbar.h"

typedef slicefab_xbar__portx__stride40_t sf_port_block;

#define PORT_BASE ((uint32_t)offsetof(slicefab_xbar_t, port))
#define PORT_STRIDE ((uint32_t)sizeof(sf_port_block))
#define MAP_PORTS (sizeof(((slicefab_xbar_t *)0)->port) / sizeof(sf_port_block))

_Static_assert(MAP_PORTS == SF_MAX_PORTS, "SF_MAX_PORTS must be the register map's port count");
_Static_assert((SLICEFAB_XBAR__PORTX__KEYS__MASK_bm >> SLICEFAB_XBAR__PORTX__KEYS__MASK_bp) ==
                   (1u << SF_MAX_KEYS) - 1,
               "SF_MAX_KEYS must be the width of port[].KEYS.mask");

/* The shadow registers in register-map order: their offsets inside a port block. */
static const uint32_t SHADOW_OFFSET[SF_SHADOW_REGS] = {
    offsetof(sf_port_block, PERM_LO), offsetof(sf_port_block, PERM_HI),
    offsetof(sf_port_block, WEIGHT),  offsetof(sf_port_block, TB_RATE),
    offsetof(sf_port_block, TB_BURST), offsetof(sf_port_block, KEYS),
};

#define FIELD_MAX(reg, fld) \
    ((uint64_t)(SLICEFAB_XBAR__PORTX__##reg##__##fld##_bm) >> SLICEFAB_XBAR__PORTX__##reg##__##fld##_bp)
#define FIELD_PUT(reg, fld, v) \
    ((uint32_t)(((uint64_t)(v) << SLICEFAB_XBAR__PORTX__##reg##__##fld##_bp) & \
                SLICEFAB_XBAR__PORTX__##reg##__##fld##_bm))

#define MAX_WEIGHT FIELD_MAX(WEIGHT, WEIGHT)
#define MAX_RATE FIELD_MAX(TB_RATE, RATE)
#define MAX_BURST FIELD_MAX(TB_BURST, BURST)
#define RATE_FRAC 16 /* TB_RATE.rate is unsigned 16.16 bytes per cycle */
#define BURST_CYCLES 1024

uint32_t sf_xbar_shadow_addr(uint32_t port, uint32_t reg) {
    if (port >= SF_MAX_PORTS || reg >= SF_SHADOW_REGS) return 0; /* 0 is ID: never a shadow */
    return PORT_BASE + port * PORT_STRIDE + SHADOW_OFFSET[reg];
}

static int check_params(const sf_xbar_params *xb, sf_error *err) {
    if (!xb) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (xb->n_ports < 1 || xb->n_ports > SF_MAX_PORTS)
        return sf_fail(err, SF_ERANGE, SF_F_N_PORTS, -1, xb->n_ports, SF_MAX_PORTS);
    if (xb->n_keys < 1 || xb->n_keys > SF_MAX_KEYS)
        return sf_fail(err, SF_ERANGE, SF_F_N_KEYS, -1, xb->n_keys, SF_MAX_KEYS);
    if (xb->port_mbps < 1 || xb->port_mbps > (uint64_t)SF_MAX_MBPS)
        return sf_fail(err, SF_ERANGE, SF_F_PORT_MBPS, -1, (int64_t)xb->port_mbps, SF_MAX_MBPS);
    if (xb->clock_mhz < 1 || xb->clock_mhz > SF_MAX_CLOCK_MHZ)
        return sf_fail(err, SF_ERANGE, SF_F_CLOCK_MHZ, -1, xb->clock_mhz, SF_MAX_CLOCK_MHZ);
    if (xb->data_bytes < 1 || xb->data_bytes > 255)
        return sf_fail(err, SF_ERANGE, SF_F_DATA_BYTES, -1, xb->data_bytes, 255);
    return SF_OK;
}

int sf_xbar_demand(const sf_xbar_params *xb, const sf_slice *slices, uint32_t n_slices,
                   sf_port_demand *out, uint32_t n_out, sf_error *err) {
    int rc = check_params(xb, err);
    if (rc) return rc;
    if (!out || n_out != xb->n_ports)
        return sf_fail(err, SF_EINVAL, SF_F_N_PORTS, -1, n_out, xb->n_ports);
    if (n_slices && !slices) return sf_fail(err, SF_EINVAL, SF_F_N_SLICES, -1, n_slices, 0);
    const uint64_t port_set = xb->n_ports == 64 ? ~(uint64_t)0 : ((uint64_t)1 << xb->n_ports) - 1;
    sf_port_demand d[SF_MAX_PORTS];
    for (uint32_t p = 0; p < xb->n_ports; p++) {
        d[p].owner = -1;
        d[p].priority = 0;
        d[p].guaranteed_mbps = 0;
        d[p].limit_mbps = 0;
        d[p].keys = 0;
    }
    for (uint32_t i = 0; i < n_slices; i++) {
        const sf_slice *s = &slices[i];
        if (s->owner < 0) return sf_fail(err, SF_ERANGE, SF_F_OWNER, i, s->owner, 0);
        if (s->priority > SF_MAX_PRIORITY)
            return sf_fail(err, SF_ERANGE, SF_F_PRIORITY, i, s->priority, SF_MAX_PRIORITY);
        if (s->guaranteed_mbps > xb->port_mbps)
            return sf_fail(err, SF_ERANGE, SF_F_GUARANTEED, i, (int64_t)s->guaranteed_mbps,
                           (int64_t)xb->port_mbps);
        if (s->max_mbps > xb->port_mbps)
            return sf_fail(err, SF_ERANGE, SF_F_MAX_BW, i, (int64_t)s->max_mbps,
                           (int64_t)xb->port_mbps);
        if (s->key >= xb->n_keys)
            return sf_fail(err, SF_ERANGE, SF_F_KEY, i, s->key, xb->n_keys - 1);
        if (s->ports & ~port_set)
            return sf_fail(err, SF_ERANGE, SF_F_PORTS, i, (int64_t)(s->ports & ~port_set),
                           xb->n_ports);
        const uint64_t limit = s->max_mbps ? s->max_mbps : xb->port_mbps;
        for (uint64_t m = s->ports; m; m &= m - 1) {
            const uint32_t p = (uint32_t)__builtin_ctzll(m);
            sf_port_demand *pd = &d[p];
            /* sums stay within SF_MAX_MBPS: no overflow, and a bound sf_xbar_image accepts */
            if (pd->guaranteed_mbps + s->guaranteed_mbps > (uint64_t)SF_MAX_MBPS)
                return sf_fail(err, SF_ERANGE, SF_F_GUARANTEED, i,
                               (int64_t)(pd->guaranteed_mbps + s->guaranteed_mbps), SF_MAX_MBPS);
            if (pd->limit_mbps + limit > (uint64_t)SF_MAX_MBPS)
                return sf_fail(err, SF_ERANGE, SF_F_LIMIT, i, (int64_t)(pd->limit_mbps + limit),
                               SF_MAX_MBPS);
            pd->owner = s->owner;
            if (s->priority > pd->priority) pd->priority = s->priority;
            pd->guaranteed_mbps += s->guaranteed_mbps;
            pd->limit_mbps += limit;
            pd->keys |= (uint32_t)1 << s->key;
        }
    }
    memcpy(out, d, sizeof(sf_port_demand) * xb->n_ports);
    return sf_ok(err);
}

static uint64_t weight_for(uint64_t priority, uint64_t guaranteed, uint64_t capacity) {
    const uint64_t share = (guaranteed * 64 + capacity - 1) / capacity;
    const uint64_t w = 1 + 4 * priority + share;
    return w < MAX_WEIGHT ? w : MAX_WEIGHT;
}

static uint64_t rate_for(uint64_t mbps, uint64_t clock_mhz) {
    /* Mbit/s -> bytes per cycle, 16.16, rounded to nearest, never 0 (image.rate_for) */
    const uint64_t den = 8 * clock_mhz;
    uint64_t r = ((mbps << RATE_FRAC) + den / 2) / den;
    if (r > MAX_RATE) r = MAX_RATE;
    return r < 1 ? 1 : r;
}

static uint64_t burst_for(uint64_t rate, uint64_t data_bytes) {
    uint64_t b = (rate * BURST_CYCLES) >> RATE_FRAC;
    if (b > MAX_BURST) b = MAX_BURST;
    return b > 2 * data_bytes ? b : 2 * data_bytes;
}

/* Each owner's ports as a mask, found through a small open-addressing table keyed by owner
 * (at most SF_MAX_PORTS distinct owners). slot[p] is the table slot of port p's owner. */
#define OWNER_SLOTS (2 * SF_MAX_PORTS)

static void owner_masks(const sf_port_demand *d, uint32_t n, uint64_t *mask_of_port) {
    int64_t key[OWNER_SLOTS];
    uint64_t mask[OWNER_SLOTS];
    uint8_t slot_of[SF_MAX_PORTS];
    for (uint32_t i = 0; i < OWNER_SLOTS; i++) key[i] = -1;
    for (uint32_t p = 0; p < n; p++) {
        if (d[p].owner < 0) continue;
        uint64_t h = (uint64_t)d[p].owner * 0x9E3779B97F4A7C15ull;
        uint32_t s = (uint32_t)(h >> 57); /* 7 bits: 0..127 */
        while (key[s] != -1 && key[s] != d[p].owner) s = (s + 1) % OWNER_SLOTS;
        if (key[s] == -1) {
            key[s] = d[p].owner;
            mask[s] = 0;
        }
        mask[s] |= (uint64_t)1 << p;
        slot_of[p] = (uint8_t)s;
    }
    for (uint32_t p = 0; p < n; p++) mask_of_port[p] = d[p].owner < 0 ? 0 : mask[slot_of[p]];
}

static int check_demand(const sf_xbar_params *xb, const sf_port_demand *demand, uint32_t n,
                        sf_error *err) {
    if (!demand || n != xb->n_ports) return sf_fail(err, SF_EINVAL, SF_F_N_PORTS, -1, n, xb->n_ports);
    const uint32_t key_set = ((uint32_t)1 << xb->n_keys) - 1;
    for (uint32_t p = 0; p < n; p++) {
        const sf_port_demand *d = &demand[p];
        if (d->owner < -1) return sf_fail(err, SF_ERANGE, SF_F_OWNER, p, d->owner, -1);
        if (d->priority > SF_MAX_PRIORITY)
            return sf_fail(err, SF_ERANGE, SF_F_PRIORITY, p, d->priority, SF_MAX_PRIORITY);
        if (d->guaranteed_mbps > (uint64_t)SF_MAX_MBPS)
            return sf_fail(err, SF_ERANGE, SF_F_GUARANTEED, p, (int64_t)d->guaranteed_mbps,
                           SF_MAX_MBPS);
        if (d->limit_mbps > (uint64_t)SF_MAX_MBPS)
            return sf_fail(err, SF_ERANGE, SF_F_LIMIT, p, (int64_t)d->limit_mbps, SF_MAX_MBPS);
        if (d->keys & ~key_set)
            return sf_fail(err, SF_ERANGE, SF_F_KEYS, p, d->keys, key_set);
    }
    return SF_OK;
}

static void encode_image(const sf_xbar_params *xb, const sf_port_demand *demand, uint32_t n,
                         uint32_t *image) {
    uint64_t perm[SF_MAX_PORTS];
    owner_masks(demand, n, perm);
    for (uint32_t p = 0; p < n; p++) {
        const sf_port_demand *d = &demand[p];
        uint32_t *r = &image[p * SF_SHADOW_REGS];
        if (d->owner < 0) { /* a port nobody holds keeps its reset configuration */
            r[0] = FIELD_PUT(PERM_LO, ALLOWED, SLICEFAB_XBAR__PORTX__PERM_LO__ALLOWED_reset);
            r[1] = FIELD_PUT(PERM_HI, ALLOWED, SLICEFAB_XBAR__PORTX__PERM_HI__ALLOWED_reset);
            r[2] = FIELD_PUT(WEIGHT, WEIGHT, SLICEFAB_XBAR__PORTX__WEIGHT__WEIGHT_reset);
            r[3] = FIELD_PUT(TB_RATE, RATE, SLICEFAB_XBAR__PORTX__TB_RATE__RATE_reset);
            r[4] = FIELD_PUT(TB_BURST, BURST, SLICEFAB_XBAR__PORTX__TB_BURST__BURST_reset) |
                   FIELD_PUT(TB_BURST, ENABLE, SLICEFAB_XBAR__PORTX__TB_BURST__ENABLE_reset);
            r[5] = FIELD_PUT(KEYS, MASK, SLICEFAB_XBAR__PORTX__KEYS__MASK_reset);
            continue;
        }
        const uint64_t mbps = d->limit_mbps < xb->port_mbps ? d->limit_mbps : xb->port_mbps;
        const uint64_t rate = rate_for(mbps, xb->clock_mhz);
        r[0] = FIELD_PUT(PERM_LO, ALLOWED, perm[p] & 0xFFFFFFFFu);
        r[1] = FIELD_PUT(PERM_HI, ALLOWED, perm[p] >> 32);
        r[2] = FIELD_PUT(WEIGHT, WEIGHT, weight_for(d->priority, d->guaranteed_mbps, xb->port_mbps));
        r[3] = FIELD_PUT(TB_RATE, RATE, rate);
        r[4] = FIELD_PUT(TB_BURST, BURST, burst_for(rate, xb->data_bytes)) |
               FIELD_PUT(TB_BURST, ENABLE, 1);
        r[5] = FIELD_PUT(KEYS, MASK, d->keys);
    }
}

int sf_xbar_image(const sf_xbar_params *xb, const sf_port_demand *demand, uint32_t n_demand,
                  uint32_t *image, uint32_t image_len, sf_error *err) {
    int rc = check_params(xb, err);
    if (rc) return rc;
    rc = check_demand(xb, demand, n_demand, err);
    if (rc) return rc;
    if (!image || image_len != n_demand * SF_SHADOW_REGS)
        return sf_fail(err, SF_EINVAL, SF_F_IMAGE_LEN, -1, image_len, n_demand * SF_SHADOW_REGS);
    encode_image(xb, demand, n_demand, image);
    return sf_ok(err);
}

int sf_xbar_diff(const uint32_t *current, const uint8_t *known, const uint32_t *target,
                 uint32_t n_ports, sf_reg_write *out, uint32_t out_cap, uint32_t *n_out,
                 sf_error *err) {
    if (n_ports < 1 || n_ports > SF_MAX_PORTS)
        return sf_fail(err, SF_ERANGE, SF_F_N_PORTS, -1, n_ports, SF_MAX_PORTS);
    if (!current || !target || !n_out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    const uint32_t regs = n_ports * SF_SHADOW_REGS;
    if (!out || out_cap < regs) return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, out_cap, regs);
    uint32_t n = 0;
    /* port blocks ascend and the shadow offsets ascend inside a block: address order */
    for (uint32_t p = 0; p < n_ports; p++) {
        const uint32_t base = PORT_BASE + p * PORT_STRIDE;
        for (uint32_t r = 0; r < SF_SHADOW_REGS; r++) {
            const uint32_t i = p * SF_SHADOW_REGS + r;
            if ((known && !known[i]) || current[i] != target[i]) {
                out[n].addr = base + SHADOW_OFFSET[r];
                out[n].value = target[i];
                n++;
            }
        }
    }
    *n_out = n;
    return sf_ok(err);
}

int sf_xbar_reconfigure(const sf_xbar_params *xb, const sf_port_demand *demand,
                        uint32_t n_demand, const uint32_t *current, const uint8_t *known,
                        uint32_t *target, uint32_t image_len, sf_reg_write *out,
                        uint32_t out_cap, uint32_t *n_out, sf_error *err) {
    int rc = sf_xbar_image(xb, demand, n_demand, target, image_len, err);
    if (rc) return rc;
    return sf_xbar_diff(current, known, target, n_demand, out, out_cap, n_out, err);
}
