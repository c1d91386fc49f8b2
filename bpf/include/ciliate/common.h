/* SPDX-License-Identifier: Apache-2.0 */
/* Includes, constants and the verdict encoding every program shares. */
#ifndef CILIATE_COMMON_H
#define CILIATE_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ciliate/abi.h"
#include "config.h" /* rendered from bpf/datapath.toml */

/* uapi/linux/pkt_cls.h and if_ether.h are #defines, absent from BTF. */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7

#define ETH_ALEN 6
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif /* __always_inline */

/* Source id of a file, folded to a constant by clang (the strcmp calls all
 * have literal arguments). Keep in step with enum ciliate_source; a test
 * checks that every id names a file in bpf/. */
static __always_inline __u8 ciliate_source_id(const char *name)
{
	if (!__builtin_strcmp(name, "bpf_lxc.c"))
		return CILIATE_SRC_BPF_LXC_C;
	if (!__builtin_strcmp(name, "bpf_host.c"))
		return CILIATE_SRC_BPF_HOST_C;
	if (!__builtin_strcmp(name, "bpf_uplink.c"))
		return CILIATE_SRC_BPF_UPLINK_C;
	if (!__builtin_strcmp(name, "eth.h"))
		return CILIATE_SRC_ETH_H;
	if (!__builtin_strcmp(name, "ipv4.h"))
		return CILIATE_SRC_IPV4_H;
	if (!__builtin_strcmp(name, "arp.h"))
		return CILIATE_SRC_ARP_H;
	if (!__builtin_strcmp(name, "lxc.h"))
		return CILIATE_SRC_LXC_H;
	if (!__builtin_strcmp(name, "forward.h"))
		return CILIATE_SRC_FORWARD_H;
	if (!__builtin_strcmp(name, "policy.h"))
		return CILIATE_SRC_POLICY_H;
	if (!__builtin_strcmp(name, "conntrack.h"))
		return CILIATE_SRC_CONNTRACK_H;
	if (!__builtin_strcmp(name, "lb.h"))
		return CILIATE_SRC_LB_H;
	return CILIATE_SRC_UNKNOWN;
}

/*
 * A stage returns a TC_ACT_* verdict (>= 0) or a drop made by DROP(), which
 * packs the reason with the file and line that decided it, so the single
 * exit of the entry point can report where the drop came from:
 *   -(source << 24 | line << 8 | reason)
 */
#define DROP(reason) \
	(-(int)(((__u32)ciliate_source_id(__FILE_NAME__) << 24) | \
		(((__u32)__LINE__ & 0xffff) << 8) | (__u32)(reason)))

#define IS_DROP(ret) ((ret) < 0)
#define DROP_REASON(ret) ((__u8)(-(ret) & 0xff))
#define DROP_LINE(ret) ((__u16)((-(ret) >> 8) & 0xffff))
#define DROP_SOURCE(ret) ((__u8)((-(ret) >> 24) & 0x7f))

/* What the single exit reports: where a forwarded packet went, and what
 * the policy stage decided about it (for drop and policy events). */
struct trace_info {
	__u8 point;             /* enum ciliate_trace_point, 0 = none */
	__u8 policy;            /* 1: the policy fields below are set */
	__u8 policy_dir;        /* enum ciliate_direction of the last policy looked at */
	__u8 protocol;
	__u16 dport;            /* host byte order */
	__u32 target_ifindex;
	__u32 src_identity;
	__u32 dst_identity;
};

#endif /* CILIATE_COMMON_H */
