/* PCIe lanes in ports, handed out as naturally aligned groups (x1..x16).
 *
 * The C twin of firmware/resources/lanes.py (the reference, which documents the buddy-like
 * policy: fill a hole next to a used link, then the busiest port, then the lowest lane).
 */
#include <stdlib.h>
#include <string.h>

#include "sf_internal.h"

struct sf_lanes {
    uint32_t n_ports;
    uint32_t total;
    uint32_t held_total;
    uint32_t widest;
    uint32_t *size;       /* lanes per port */
    uint32_t *base;       /* first global lane of each port */
    uint32_t *port_free;  /* free lanes per port */
    uint32_t *port_of;    /* lane -> port */
    uint8_t *held;        /* lane -> 1 if held */
    uint8_t *group;       /* lane -> width of the group handed out starting there, or 0 */
    uint8_t *excluded;    /* scratch for allocate(); all zero between calls */
};

static int is_link_width(uint32_t w) { return w == 1 || w == 2 || w == 4 || w == 8 || w == 16; }

void sf_lanes_free(sf_lanes *l) {
    if (!l) return;
    free(l->size);
    free(l->base);
    free(l->port_free);
    free(l->port_of);
    free(l->held);
    free(l->group);
    free(l->excluded);
    free(l);
}

sf_lanes *sf_lanes_new(const uint32_t *port_lanes, uint32_t n_ports, sf_error *err) {
    if (!port_lanes || n_ports < 1 || n_ports > SF_MAX_LANE_PORTS) {
        sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, n_ports, SF_MAX_LANE_PORTS);
        return NULL;
    }
    uint32_t total = 0;
    for (uint32_t p = 0; p < n_ports; p++) {
        if (!is_link_width(port_lanes[p])) {
            sf_fail(err, SF_ERANGE, SF_F_WIDTH, p, port_lanes[p], 16);
            return NULL;
        }
        total += port_lanes[p]; /* at most 256 x 16: no overflow */
    }
    sf_lanes *l = calloc(1, sizeof *l);
    if (!l) {
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    l->n_ports = n_ports;
    l->total = total;
    l->size = malloc(sizeof(uint32_t) * n_ports);
    l->base = malloc(sizeof(uint32_t) * n_ports);
    l->port_free = malloc(sizeof(uint32_t) * n_ports);
    l->port_of = malloc(sizeof(uint32_t) * total);
    l->held = calloc(total, 1);
    l->group = calloc(total, 1);
    l->excluded = calloc(total, 1);
    if (!l->size || !l->base || !l->port_free || !l->port_of || !l->held || !l->group ||
        !l->excluded) {
        sf_lanes_free(l);
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    uint32_t first = 0;
    for (uint32_t p = 0; p < n_ports; p++) {
        l->size[p] = l->port_free[p] = port_lanes[p];
        l->base[p] = first;
        if (port_lanes[p] > l->widest) l->widest = port_lanes[p];
        for (uint32_t i = 0; i < port_lanes[p]; i++) l->port_of[first + i] = p;
        first += port_lanes[p];
    }
    sf_ok(err);
    return l;
}

uint32_t sf_lanes_free_total(const sf_lanes *l) { return l ? l->total - l->held_total : 0; }

int sf_lanes_port_free(const sf_lanes *l, uint32_t port, uint32_t *out, sf_error *err) {
    if (!l || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (port >= l->n_ports) return sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, port, l->n_ports - 1);
    *out = l->port_free[port];
    return sf_ok(err);
}

int sf_lanes_lane_held(const sf_lanes *l, uint32_t lane, int *out, sf_error *err) {
    if (!l || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (lane >= l->total) return sf_fail(err, SF_ERANGE, SF_F_LANE, -1, lane, l->total - 1);
    *out = l->held[lane];
    return sf_ok(err);
}

int sf_lanes_group_at(const sf_lanes *l, uint32_t first, uint32_t *width, sf_error *err) {
    if (!l || !width) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (first >= l->total) return sf_fail(err, SF_ERANGE, SF_F_LANE, -1, first, l->total - 1);
    *width = l->group[first];
    return sf_ok(err);
}

/* A link this device can carry: port exists, width x1..x16 within the port, aligned. */
static int check_group(const sf_lanes *l, uint32_t port, uint32_t first, uint32_t width,
                       sf_error *err) {
    if (port >= l->n_ports) return sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, port, l->n_ports - 1);
    if (!is_link_width(width) || width > l->size[port])
        return sf_fail(err, SF_ERANGE, SF_F_WIDTH, -1, width, l->size[port]);
    if (first < l->base[port] || first >= l->base[port] + l->size[port])
        return sf_fail(err, SF_ERANGE, SF_F_LANE, -1, first, l->base[port] + l->size[port] - 1);
    if ((first - l->base[port]) % width)
        return sf_fail(err, SF_EINVAL, SF_F_LANE, -1, first, width);
    return SF_OK;
}

static int run_free(const sf_lanes *l, uint32_t first, uint32_t width, int honour_exclude) {
    for (uint32_t i = first; i < first + width; i++)
        if (l->held[i] || (honour_exclude && l->excluded[i])) return 0;
    return 1;
}

int sf_lanes_is_free(const sf_lanes *l, uint32_t first, uint32_t width, int *out, sf_error *err) {
    if (!l || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (first >= l->total) return sf_fail(err, SF_ERANGE, SF_F_LANE, -1, first, l->total - 1);
    int rc = check_group(l, l->port_of[first], first, width, err);
    if (rc) return rc;
    *out = run_free(l, first, width, 0);
    return sf_ok(err);
}

static void hold(sf_lanes *l, uint32_t port, uint32_t first, uint32_t width) {
    memset(l->held + first, 1, width);
    l->group[first] = (uint8_t)width;
    l->port_free[port] -= width;
    l->held_total += width;
}

/* True if the aligned block of 2*width lanes around first has a held lane. */
static int buddy_used(const sf_lanes *l, uint32_t port, uint32_t first, uint32_t width) {
    const uint32_t block = 2 * width, base = l->base[port];
    if (block > l->size[port]) return 0;
    const uint32_t start = base + (first - base) / block * block;
    for (uint32_t i = start; i < start + block; i++)
        if (l->held[i]) return 1;
    return 0;
}

int sf_lanes_allocate(sf_lanes *l, uint32_t width, int32_t port, const uint32_t *exclude,
                      uint32_t n_exclude, uint32_t *out_port, uint32_t *out_first,
                      sf_error *err) {
    if (!l || !out_port || !out_first || (n_exclude && !exclude))
        return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (port < -1 || port >= (int32_t)l->n_ports)
        return sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, port, l->n_ports - 1);
    const uint32_t limit = port < 0 ? l->widest : l->size[port];
    if (!is_link_width(width) || width > limit)
        return sf_fail(err, SF_ERANGE, SF_F_WIDTH, -1, width, limit);
    for (uint32_t i = 0; i < n_exclude; i++)
        if (exclude[i] >= l->total)
            return sf_fail(err, SF_ERANGE, SF_F_LANE, i, exclude[i], l->total - 1);
    for (uint32_t i = 0; i < n_exclude; i++) l->excluded[exclude[i]] = 1;

    const uint32_t p0 = port < 0 ? 0 : (uint32_t)port;
    const uint32_t p1 = port < 0 ? l->n_ports : (uint32_t)port + 1;
    int found = 0;
    uint32_t best_hole = 0, best_free = 0, best_first = 0, best_port = 0;
    for (uint32_t p = p0; p < p1; p++) {
        const uint32_t base = l->base[p], size = l->size[p];
        for (uint32_t first = base; width <= size && first + width <= base + size; first += width) {
            if (!run_free(l, first, width, 1)) continue;
            /* key (not buddy_used, port free, first lane): smaller wins */
            const uint32_t hole = !buddy_used(l, p, first, width);
            if (!found || hole < best_hole ||
                (hole == best_hole && (l->port_free[p] < best_free ||
                                       (l->port_free[p] == best_free && first < best_first)))) {
                found = 1;
                best_hole = hole;
                best_free = l->port_free[p];
                best_first = first;
                best_port = p;
            }
        }
    }
    int rc;
    if (found) {
        hold(l, best_port, best_first, width);
        *out_port = best_port;
        *out_first = best_first;
        rc = sf_ok(err);
    } else {
        uint32_t largest = 0; /* the widest free aligned group the same request could get */
        for (uint32_t p = p0; p < p1; p++)
            for (uint32_t w = 1; w <= 16; w *= 2)
                for (uint32_t first = l->base[p]; w <= l->size[p] && first + w <= l->base[p] + l->size[p];
                     first += w)
                    if (run_free(l, first, w, 1) && w > largest) {
                        largest = w;
                        break;
                    }
        rc = sf_fail(err, SF_ENOSPC, SF_F_WIDTH, -1, width, largest);
    }
    for (uint32_t i = 0; i < n_exclude; i++) l->excluded[exclude[i]] = 0;
    return rc;
}

int sf_lanes_take(sf_lanes *l, uint32_t port, uint32_t first, uint32_t width, sf_error *err) {
    if (!l) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    int rc = check_group(l, port, first, width, err);
    if (rc) return rc;
    for (uint32_t i = first; i < first + width; i++)
        if (l->held[i]) return sf_fail(err, SF_ECONFLICT, SF_F_LANE, -1, i, 0);
    hold(l, port, first, width);
    return sf_ok(err);
}

int sf_lanes_give(sf_lanes *l, uint32_t port, uint32_t first, uint32_t width, sf_error *err) {
    if (!l) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    int rc = check_group(l, port, first, width, err);
    if (rc) return rc;
    if (l->group[first] != width) {
        int some_free = 0;
        for (uint32_t i = first; i < first + width; i++) some_free |= !l->held[i];
        return sf_fail(err, SF_ENOTHELD, SF_F_GROUP, -1, some_free, 0);
    }
    memset(l->held + first, 0, width);
    l->group[first] = 0;
    l->port_free[port] += width;
    l->held_total -= width;
    return sf_ok(err);
}

uint32_t sf_lanes_widest(const sf_lanes *l) { return l->widest; }
uint32_t sf_lanes_total(const sf_lanes *l) { return l->total; }
