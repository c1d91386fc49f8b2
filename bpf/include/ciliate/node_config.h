/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-node values: read-only globals the agent writes into .rodata before
 * the object is loaded. One compiled object serves every node; the
 * verifier prunes what these values make dead.
 */
#ifndef CILIATE_NODE_CONFIG_H
#define CILIATE_NODE_CONFIG_H

#include "ciliate/common.h"

/* Router and node IP in network byte order. */
const volatile __u32 router_ip = 0;
const volatile __u32 node_ip = 0;
/* 1 when ciliate's service load balancer is off (a kube-proxy may be
 * translating in the stack): replies of NATed connections go through the
 * stack (stack_nat.h). */
const volatile __u8 stack_nat_replies = 0;
/* Pod CIDRs: first address (host byte order), number of addresses (0 =
 * unused), and the endpoint slot of the first address. The slots of all
 * CIDRs together index ciliate_ep_ip. */
const volatile __u32 pod_cidr_first[CILIATE_MAX_POD_CIDRS] = {};
const volatile __u32 pod_cidr_size[CILIATE_MAX_POD_CIDRS] = {};
const volatile __u32 pod_cidr_slot[CILIATE_MAX_POD_CIDRS] = {};

/* Types used only through pointers (ring buffer records) are not emitted in
 * BTF; this anchor keeps them there, so tools and the ABI test see them. */
const volatile struct ciliate_event *const ciliate_btf_anchor_event = 0;

/* The endpoint slot of a pod IP (network byte order), if it lies in one of
 * this node's pod CIDRs. One subtraction and compare per CIDR: an address
 * below the CIDR wraps around to a large offset and fails the same test. */
static __always_inline bool endpoint_slot(__u32 addr, __u32 *slot)
{
	__u32 host = bpf_ntohl(addr);

#pragma unroll
	for (int i = 0; i < CILIATE_MAX_POD_CIDRS; i++) {
		__u32 offset = host - pod_cidr_first[i];

		if (offset < pod_cidr_size[i]) {
			*slot = pod_cidr_slot[i] + offset;
			return true;
		}
	}
	return false;
}

#endif /* CILIATE_NODE_CONFIG_H */
