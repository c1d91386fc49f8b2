/* SPDX-License-Identifier: Apache-2.0 */
/* The pod side: what a pod sends (from-container) and receives (to-container). */
#ifndef CILIATE_LXC_H
#define CILIATE_LXC_H

#include "ciliate/common.h"
#include "ciliate/node_config.h"
#include "ciliate/eth.h"
#include "ciliate/ipv4.h"
#include "ciliate/arp.h"
#include "ciliate/forward.h"
#include "ciliate/policy.h"
#include "ciliate/stack_nat.h"
#include "maps.h"
#if CILIATE_FEATURE_SERVICES
#include "ciliate/lb.h"
#endif /* CILIATE_FEATURE_SERVICES */

static __always_inline int lxc_ipv4(struct __sk_buff *ctx, struct ethhdr *eth,
				    const struct ciliate_endpoint *ep,
				    struct trace_info *trace)
{
	const struct ciliate_endpoint *dst;
	struct ciliate_ipcache_value *owner;
	struct iphdr *ip;
	__u32 slot;
	int ret;

	ret = ipv4_parse(ctx, &ip);
	if (IS_DROP(ret))
		return ret;
	/* Anti-spoofing: a pod sends only from its own MAC and IP. */
	if (!mac_equal(eth->h_source, ep->mac))
		return DROP(CILIATE_DROP_INVALID_SMAC);
	if (ip->saddr != ep->ipv4)
		return DROP(CILIATE_DROP_INVALID_SIP);

	if (ip->daddr == router_ip || ip->daddr == node_ip) {
		ret = policy_check(ctx, ip, ep, NULL, CILIATE_IDENTITY_HOST, trace);
		if (IS_DROP(ret))
			return ret;
		trace->point = CILIATE_TRACE_TO_STACK;
		return TC_ACT_OK;
	}
	if (endpoint_slot(ip->daddr, &slot)) {
		dst = lookup_endpoint_slot(slot);
		/* Only endpoints live in our pod CIDRs; the stack would route
		 * anything else straight back to cilium_host. */
		if (!dst)
			return DROP(CILIATE_DROP_UNKNOWN_ENDPOINT);
		/* The receiver's ingress is decided here too: redirect_peer
		 * skips its veth's programs. */
		ret = policy_check(ctx, ip, ep, dst, 0, trace);
		if (IS_DROP(ret))
			return ret;
		/* A kube-proxy's translated reply: the stack reverses it. */
		if (stack_nat_reply(ctx, ip, trace))
			return TC_ACT_OK;
		return forward_to_pod(ctx, eth, ip, dst, trace);
	}

	owner = lookup_ipcache(ip->daddr);
	ret = policy_check(ctx, ip, ep, NULL, ipcache_identity(owner), trace);
	if (IS_DROP(ret))
		return ret;
#if CILIATE_FEATURE_SERVICES
	/* The reply of a flow the uplink translated to this pod leaves as
	 * the service (lb.h). */
	ret = lb_rev_nat_from_pod(ctx, ip, trace);
	if (ret != CILIATE_LB_PASS)
		return ret;
#endif /* CILIATE_FEATURE_SERVICES */
	trace->point = owner && owner->node_ip ? CILIATE_TRACE_TO_REMOTE : CILIATE_TRACE_TO_STACK;
	return TC_ACT_OK;
}

static __always_inline int handle_from_container(struct __sk_buff *ctx, struct trace_info *trace)
{
	const struct ciliate_endpoint *ep;
	struct ethhdr *eth;
	int ret;

	ep = lookup_endpoint_by_ifindex(ctx->ifindex);
	if (!ep)
		return DROP(CILIATE_DROP_NO_ENDPOINT_FOR_IFINDEX);
	ret = eth_parse(ctx, &eth);
	if (IS_DROP(ret))
		return ret;

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP):
		return lxc_ipv4(ctx, eth, ep, trace);
	case bpf_htons(ETH_P_ARP):
		return arp_respond(ctx, eth, ep, trace);
	default:
		return DROP(CILIATE_DROP_UNKNOWN_L3);
	}
}

#endif /* CILIATE_LXC_H */
