/* SPDX-License-Identifier: Apache-2.0 */
/* Delivery into a local pod, shared by the pod veth and the uplink. */
#ifndef CILIATE_FORWARD_H
#define CILIATE_FORWARD_H

#include "ciliate/common.h"
#include "ciliate/eth.h"
#include "ciliate/ipv4.h"

/*
 * Route an IPv4 packet into the pod `dst` as a router would (its MACs on
 * the pod's link, TTL - 1) and hand it straight to the pod's eth0 in the
 * pod's netns (bpf_redirect_peer: no second pass through the host stack
 * or the host-side veth). Only valid at a tc ingress hook.
 */
static __always_inline int forward_to_pod(struct __sk_buff *ctx __attribute__((unused)),
					  struct ethhdr *eth, struct iphdr *ip,
					  const struct ciliate_endpoint *dst,
					  struct trace_info *trace)
{
	long ret;

	if (ip->ttl <= 1)
		return DROP(CILIATE_DROP_TTL_EXCEEDED);
	eth_set_addrs(eth, dst->mac, dst->node_mac);
	ipv4_dec_ttl(ip);
	trace->point = CILIATE_TRACE_TO_POD;
	trace->target_ifindex = dst->ifindex;
	ret = bpf_redirect_peer(dst->ifindex, 0);
	if (ret != TC_ACT_REDIRECT)
		return DROP(CILIATE_DROP_REDIRECT_FAILED);
	return TC_ACT_REDIRECT;
}

#endif /* CILIATE_FORWARD_H */
