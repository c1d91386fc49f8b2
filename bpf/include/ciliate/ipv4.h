/* SPDX-License-Identifier: Apache-2.0 */
/*
 * IPv4: header bounds, TTL.
 *
 * Fragments: forwarding decisions (anti-spoofing, endpoint and ipcache
 * lookups) read only the IPv4 header, which each fragment carries whole, so
 * fragments are forwarded one by one like unfragmented packets, with no
 * reassembly. The policy stage needs ports, which only the first fragment
 * carries: it records them for the later fragments of its datagram
 * (ciliate_frag, conntrack.h), which are tracked and judged with them.
 */
#ifndef CILIATE_IPV4_H
#define CILIATE_IPV4_H

#include "ciliate/common.h"

static __always_inline int ipv4_parse(struct __sk_buff *ctx, struct iphdr **out)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);

	if ((void *)(ip + 1) > data_end)
		return DROP(CILIATE_DROP_TRUNCATED);
	if (ip->version != 4 || ip->ihl < 5)
		return DROP(CILIATE_DROP_INVALID_IP_HEADER);
	if ((void *)ip + ip->ihl * 4 > data_end)
		return DROP(CILIATE_DROP_TRUNCATED);
	*out = ip;
	return TC_ACT_OK;
}

/* TTL - 1 with an incremental checksum update (RFC 1624): TTL is the high
 * byte of its 16-bit word, so the sum grows by 0x0100 with end-around carry,
 * as the kernel's ip_decrease_ttl() does. */
static __always_inline void ipv4_dec_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
}

#endif /* CILIATE_IPV4_H */
