/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Metrics, events and the single exit of every entry point: a drop becomes
 * a metrics count plus a drop event carrying its file and line; a
 * forwarded packet is counted, and traced when tracing is switched on.
 */
#ifndef CILIATE_NOTIFY_H
#define CILIATE_NOTIFY_H

#include "ciliate/common.h"
#include "maps.h"

static __always_inline void metrics_count(__u8 reason, __u8 dir, __u32 len)
{
	__u32 idx = (__u32)reason * CILIATE_METRICS_DIRECTIONS + dir;
	struct ciliate_metrics_value *m;

	/* Per-CPU array: the lookup is inlined by the verifier and needs no
	 * atomics, which keeps counting out of the per-packet budget. */
	m = bpf_map_lookup_elem(&ciliate_metrics, &idx);
	if (m) {
		m->packets++;
		m->bytes += len;
	}
}

static __always_inline bool trace_enabled(void)
{
	__u32 zero = 0;
	struct ciliate_runtime_config *cfg;

	cfg = bpf_map_lookup_elem(&ciliate_config, &zero);
	return cfg && (cfg->flags & CILIATE_CONFIG_F_TRACE);
}

static __always_inline void send_event(struct __sk_buff *ctx, __u8 type, __u8 reason,
				       __u8 dir, __u8 source, __u16 line,
				       const struct trace_info *trace)
{
	struct ciliate_event *ev;
	__u32 cap = ctx->len;

	ev = bpf_ringbuf_reserve(&ciliate_events, sizeof(*ev), 0);
	if (!ev)
		return; /* ring full: the reader is behind, the packet is not ours to delay */
	ev->type = type;
	ev->reason = reason;
	ev->direction = dir;
	ev->source = source;
	ev->line = line;
	ev->ifindex = ctx->ifindex;
	ev->target_ifindex = type == CILIATE_EVENT_TRACE ? trace->target_ifindex : 0;
	ev->orig_len = ctx->len;
	ev->src_identity = trace->src_identity;
	ev->dst_identity = trace->dst_identity;
	ev->dport = trace->dport;
	ev->protocol = trace->protocol;
	ev->pad = 0;
	ev->ktime_ns = bpf_ktime_get_ns();
	if (cap > CILIATE_EVENT_CAPTURE_LEN)
		cap = CILIATE_EVENT_CAPTURE_LEN;
	/* The verifier wants the size proven in [1, capture len]. */
	if (cap < 1 || bpf_skb_load_bytes(ctx, 0, ev->data, cap) < 0)
		cap = 0;
	ev->cap_len = cap;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline int ciliate_exit(struct __sk_buff *ctx, int ret, __u8 dir,
					const struct trace_info *trace)
{
	if (IS_DROP(ret)) {
		/* A policy drop counts in the direction of the policy that
		 * denied it: local delivery decides the receiver's ingress in
		 * the sender's egress program. */
		if (DROP_REASON(ret) == CILIATE_DROP_POLICY_DENIED)
			dir = trace->policy_dir;
		metrics_count(DROP_REASON(ret), dir, ctx->len);
		send_event(ctx, CILIATE_EVENT_DROP, DROP_REASON(ret), dir,
			   DROP_SOURCE(ret), DROP_LINE(ret), trace);
		return TC_ACT_SHOT;
	}
	/* Traffic the program only let pass (trace point 0) is not ours to count. */
	if (!trace->point)
		return ret;
	metrics_count(CILIATE_FORWARDED, dir, ctx->len);
	if (trace_enabled())
		send_event(ctx, CILIATE_EVENT_TRACE, trace->point, dir, 0, 0, trace);
	return ret;
}

#endif /* CILIATE_NOTIFY_H */
