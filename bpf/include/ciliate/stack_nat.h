/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Beside a kube-proxy: connections the node's stack translated.
 *
 * kube-proxy (iptables or nftables) DNATs a service address to a pod in the
 * node's stack, and its conntrack entry is what turns the backend's reply
 * back into the service address. ciliate delivers a packet for a local pod
 * past the stack (bpf_redirect_peer from a pod veth or the uplink), so such
 * a reply would reach the client with the backend's address and be reset.
 * Before that redirect, the kernel's conntrack is asked whether the packet
 * belongs to a connection the stack NATed; if so the packet goes to the
 * stack, which reverse-translates it and routes it to cilium_host, from
 * where from_host delivers it.
 *
 * The question costs a conntrack hash lookup, so it is asked only when the
 * agent runs without its own service load balancer (.rodata
 * stack_nat_replies, node_config.h: the verifier removes the lookup when it
 * is 0) and only for TCP and UDP (what kube-proxy translates), first
 * fragments and unfragmented packets (later fragments carry no ports).
 */
#ifndef CILIATE_STACK_NAT_H
#define CILIATE_STACK_NAT_H

#include "ciliate/common.h"
#include "ciliate/node_config.h"

/* Fragment offset and more-fragments bits of iphdr.frag_off (host order). */
#define CILIATE_IP_OFFSET_MASK 0x1fff

/* kfuncs of net/netfilter/nf_conntrack_bpf.c (in vmlinux BTF when
 * conntrack is built in; libbpf resolves them at load). */
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb_ctx,
					 struct bpf_sock_tuple *bpf_tuple, __u32 tuple__sz,
					 struct bpf_ct_opts *opts, __u32 opts__sz) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

/* Whether the node's conntrack holds a NATed connection (either direction)
 * with this packet's addresses, protocol and ports. */
static __always_inline bool stack_nat_connection(struct __sk_buff *ctx, const struct iphdr *ip)
{
	void *data_end = (void *)(long)ctx->data_end;
	const __u8 *l4 = (const __u8 *)ip + ((ip->ihl & 0xf) << 2);
	struct bpf_sock_tuple tuple = {};
	struct bpf_ct_opts opts = {
		.netns_id = BPF_F_CURRENT_NETNS,
		.l4proto = ip->protocol,
	};
	struct nf_conn *ct;
	bool translated;

	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return false;
	if (bpf_ntohs(ip->frag_off) & CILIATE_IP_OFFSET_MASK)
		return false;
	if ((void *)(l4 + 4) > data_end)
		return false;
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = *(const __u16 *)l4;
	tuple.ipv4.dport = *(const __u16 *)(l4 + 2);
	/* The hash holds both directions of every connection: a reply's own
	 * tuple finds its entry as it is. */
	ct = bpf_skb_ct_lookup(ctx, &tuple, sizeof(tuple.ipv4), &opts, sizeof(opts));
	if (!ct)
		return false;
	/* A direct read of a kfunc's trusted pointer: CO-RE relocated (vmlinux.h
	 * marks its structs preserve_access_index). */
	translated = ct->status & (IPS_SRC_NAT | IPS_DST_NAT);
	bpf_ct_release(ct);
	return translated;
}

/*
 * Called where ciliate is about to deliver a packet to a local pod past the
 * stack: true when the stack must see it instead (the caller returns
 * TC_ACT_OK, the packet unchanged).
 */
static __always_inline bool stack_nat_reply(struct __sk_buff *ctx, const struct iphdr *ip,
					    struct trace_info *trace)
{
	if (!stack_nat_replies)
		return false;
	if (!stack_nat_connection(ctx, ip))
		return false;
	trace->point = CILIATE_TRACE_TO_STACK;
	return true;
}

#endif /* CILIATE_STACK_NAT_H */
