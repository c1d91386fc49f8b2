/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ARP responder for pods. A pod's routes send everything to the router IP
 * and its neighbours are all "on link" behind the node: whatever address
 * it asks for (other than its own), the answer is the node-side MAC of its
 * veth, and routing happens in BPF.
 */
#ifndef CILIATE_ARP_H
#define CILIATE_ARP_H

#include "ciliate/common.h"
#include "ciliate/eth.h"

#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2
#define ARPHRD_ETHER 1

/* Ethernet/IPv4 ARP body; addresses as bytes (they are not aligned). */
struct arp_eth_ipv4 {
	struct arphdr hdr;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
};

static __always_inline int arp_respond(struct __sk_buff *ctx, struct ethhdr *eth,
				       const struct ciliate_endpoint *ep,
				       struct trace_info *trace)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct arp_eth_ipv4 *arp = (void *)(eth + 1);
	__u32 sip, tip;

	if ((void *)(arp + 1) > data_end)
		return DROP(CILIATE_DROP_TRUNCATED);
	if (arp->hdr.ar_hrd != bpf_htons(ARPHRD_ETHER) ||
	    arp->hdr.ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->hdr.ar_hln != ETH_ALEN || arp->hdr.ar_pln != 4)
		return DROP(CILIATE_DROP_INVALID_ARP);
	if (!mac_equal(eth->h_source, ep->mac) || !mac_equal(arp->sha, ep->mac))
		return DROP(CILIATE_DROP_INVALID_SMAC);
	__builtin_memcpy(&sip, arp->sip, 4);
	__builtin_memcpy(&tip, arp->tip, 4);
	/* Replies, and probes for the pod's own address (duplicate address
	 * detection: no one else owns it, so no one answers), go to the stack. */
	if (arp->hdr.ar_op != bpf_htons(ARPOP_REQUEST) || tip == ep->ipv4) {
		trace->point = CILIATE_TRACE_TO_STACK;
		return TC_ACT_OK;
	}
	if (sip != ep->ipv4)
		return DROP(CILIATE_DROP_INVALID_SIP);

	/* Turn the request into the reply, in place, and send it back out of
	 * the interface it came in on: into the pod. */
	arp->hdr.ar_op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(arp->tha, ep->mac, ETH_ALEN);
	__builtin_memcpy(arp->tip, &sip, 4);
	__builtin_memcpy(arp->sha, ep->node_mac, ETH_ALEN);
	__builtin_memcpy(arp->sip, &tip, 4);
	eth_set_addrs(eth, ep->mac, ep->node_mac);
	trace->point = CILIATE_TRACE_ARP_REPLY;
	trace->target_ifindex = ctx->ifindex;
	return bpf_redirect(ctx->ifindex, 0);
}

#endif /* CILIATE_ARP_H */
