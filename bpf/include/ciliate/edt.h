/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Pod egress bandwidth (kubernetes.io/egress-bandwidth), Cilium's bandwidth
 * manager: at the uplink's tc egress a packet from a rate-limited pod gets
 * the earliest time it may leave (skb->tstamp, Earliest Departure Time),
 * one packet's length at the pod's rate after the pod's previous one; the
 * fq qdisc on the uplink holds it until then. No token bucket, no queue of
 * ours: the queue is fq's, and TCP sees the delay (and, past the horizon, a
 * loss) and slows down.
 *
 * What the pod sends to another pod of the same node never reaches the
 * uplink and is not limited (as in Cilium: the limit is on the wire).
 *
 * A kernel without sch_fq ignores departure times: there the agent gives
 * each limited pod a class of an htb qdisc on the uplink, and the packet
 * only gets that class (skb->priority, which htb classifies by first).
 */
#ifndef CILIATE_EDT_H
#define CILIATE_EDT_H

#include "ciliate/common.h"
#include "ciliate/node_config.h"
#include "maps.h"

#define NSEC_PER_SEC 1000000000ULL
/* One load or store, as written: t_last is shared by every CPU sending for
 * the pod (a lost update only lets a packet out a little early). */
#define EDT_READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define EDT_WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

/* Give a packet from a rate-limited local pod its departure time; a drop
 * when that is beyond the horizon, else 0. */
static __always_inline int edt_schedule(struct __sk_buff *ctx, const struct iphdr *ip)
{
	struct ciliate_throttle *throttle;
	__u64 now, t, t_next, len;
	__u32 slot, wire_len, skb_len;

	if (!endpoint_slot(ip->saddr, &slot))
		return 0;
	throttle = bpf_map_lookup_elem(&ciliate_throttle, &slot);
	if (!throttle)
		return 0;
	if (throttle->classid) {
		ctx->priority = throttle->classid;
		return 0;
	}
	if (!throttle->rate)
		return 0;
	now = bpf_ktime_get_ns();
	t = ctx->tstamp;
	/* A time in the past, none (0), or not a departure time at all (a
	 * receive timestamp on the wall clock): from now. */
	if (t < now || t - now > throttle->horizon)
		t = now;
	/* On the wire: every segment of a GSO packet with its headers. Both
	 * fields read, then chosen: a conditional load would make clang pick
	 * the field's address, a ctx access the verifier refuses. */
	wire_len = ctx->wire_len;
	skb_len = ctx->len;
	len = wire_len ? wire_len : skb_len;
	t_next = EDT_READ_ONCE(throttle->t_last) + len * NSEC_PER_SEC / throttle->rate;
	if (t_next <= t) {
		/* Under its rate: leaves when it would have. */
		EDT_WRITE_ONCE(throttle->t_last, t);
		return 0;
	}
	/* fq has a drop horizon too; this one keeps t_last from running away. */
	if (t_next - now >= throttle->horizon)
		return DROP(CILIATE_DROP_EDT_HORIZON);
	EDT_WRITE_ONCE(throttle->t_last, t_next);
	ctx->tstamp = t_next;
	return 0;
}

#endif /* CILIATE_EDT_H */
