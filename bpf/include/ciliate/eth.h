/* SPDX-License-Identifier: Apache-2.0 */
/* Ethernet: header bounds and MAC helpers. */
#ifndef CILIATE_ETH_H
#define CILIATE_ETH_H

#include "ciliate/common.h"

/* MACs are handled as three 16-bit words: every MAC here (Ethernet header,
 * endpoint record) is 2-byte aligned, and a memcpy of a __u8 array would
 * be lowered by clang to byte-wide loads and stores. */
static __always_inline bool mac_equal(const __u8 *a, const __u8 *b)
{
	const __u16 *x = (const __u16 *)a;
	const __u16 *y = (const __u16 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2])) == 0;
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	__u16 *d = (__u16 *)dst;
	const __u16 *s = (const __u16 *)src;

	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
}

static __always_inline void eth_set_addrs(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
	mac_copy(eth->h_dest, dst);
	mac_copy(eth->h_source, src);
}

/* The Ethernet header, or a truncation drop. */
static __always_inline int eth_parse(struct __sk_buff *ctx, struct ethhdr **out)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return DROP(CILIATE_DROP_TRUNCATED);
	*out = eth;
	return TC_ACT_OK;
}

#endif /* CILIATE_ETH_H */
