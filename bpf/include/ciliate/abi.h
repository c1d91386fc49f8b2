/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The datapath ABI: every map key and value, event record and numbered
 * table that the BPF programs share with user space, declared once.
 *
 * Python reads this very file through cffi (ciliate.datapath.abi), so it
 * stays in the subset both sides parse: fixed-width __uN fields, explicit
 * padding (no packed attribute), enums with explicit values, integer
 * #defines, comments. A trailing comment on an enumerator is its
 * human-readable text in `ciliate monitor` and the metrics tables.
 *
 * Numbers are never reused: a retired reason stays in the table, marked
 * unused. A layout change gets a new map name (ciliate_<thing>_v2).
 */
#ifndef CILIATE_ABI_H
#define CILIATE_ABI_H

#define CILIATE_EVENT_CAPTURE_LEN 64
#define CILIATE_METRICS_DIRECTIONS 2
#define CILIATE_METRICS_REASONS 256

/* Why a packet was dropped; 0 is not a drop. Codes start at 130 like
 * Cilium's so they never look like a kernel errno. */
enum ciliate_drop_reason {
	CILIATE_FORWARDED = 0,                  /* forwarded */
	CILIATE_FORWARDED_SOCKET = 1,           /* forwarded socket to socket (TCP between local pods) */
	CILIATE_FORWARDED_LB_SOCKET = 2,        /* service translated to a backend at the socket (connect, sendmsg) */
	CILIATE_FORWARDED_LB_NODEPORT = 3,      /* service packet from outside translated to a backend on this node (DNAT) */
	CILIATE_FORWARDED_LB_NODEPORT_REMOTE = 4, /* service packet from outside translated to a backend on another node (DNAT and SNAT) */
	CILIATE_FORWARDED_LB_REPLY = 5,         /* reply of a translated service flow given the service back */
	CILIATE_DROP_INVALID_SMAC = 130,        /* source MAC is not the endpoint's */
	CILIATE_DROP_INVALID_SIP = 131,         /* source IP is not the endpoint's */
	CILIATE_DROP_TTL_EXCEEDED = 132,        /* TTL expired on the way to a pod */
	CILIATE_DROP_UNKNOWN_L3 = 133,          /* unsupported ethertype */
	CILIATE_DROP_TRUNCATED = 134,           /* packet shorter than its headers */
	CILIATE_DROP_INVALID_IP_HEADER = 135,   /* IPv4 header length or version invalid */
	CILIATE_DROP_UNKNOWN_ENDPOINT = 136,    /* destination in the node's pod CIDR has no endpoint */
	CILIATE_DROP_NO_ENDPOINT_FOR_IFINDEX = 137, /* packet on a pod veth with no endpoint record */
	CILIATE_DROP_INVALID_ARP = 138,         /* ARP that is not Ethernet/IPv4 */
	CILIATE_DROP_REDIRECT_FAILED = 139,     /* redirect helper refused the target */
	CILIATE_DROP_POLICY_DENIED = 140,       /* policy denied */
	CILIATE_DROP_NO_SERVICE_BACKEND = 141,  /* service has no active backend */
	CILIATE_DROP_NO_ROUTE = 142,            /* no route for a translated service packet */
	CILIATE_DROP_EDT_HORIZON = 162,         /* pod over its egress bandwidth: departure too far ahead (Cilium's number) */
};

/* Where a forwarded packet went (trace events). */
enum ciliate_trace_point {
	CILIATE_TRACE_TO_POD = 1,       /* redirected into a local pod */
	CILIATE_TRACE_TO_STACK = 2,     /* handed to the node's stack */
	CILIATE_TRACE_TO_REMOTE = 3,    /* handed to the stack toward the owning node */
	CILIATE_TRACE_ARP_REPLY = 4,    /* ARP reply sent back to the pod */
	CILIATE_TRACE_DELIVERED = 5,    /* delivered into the pod (to-container) */
};

/* Direction relative to the pod; indexes the metrics map. */
enum ciliate_direction {
	CILIATE_DIR_INGRESS = 0,        /* toward a pod */
	CILIATE_DIR_EGRESS = 1,         /* from a pod */
};

enum ciliate_event_type {
	CILIATE_EVENT_DROP = 1,
	CILIATE_EVENT_TRACE = 2,
	CILIATE_EVENT_POLICY = 3,       /* a new connection allowed by policy (traced) */
	CILIATE_EVENT_LB = 4,           /* a service translation (traced): struct ciliate_lb_event */
};

/* Reserved identities the datapath itself assigns (Cilium's numbering; the
 * control plane's table in ciliate.control.identity holds them all). */
enum ciliate_reserved_identity {
	CILIATE_IDENTITY_ANY = 0,       /* policy entries: any peer */
	CILIATE_IDENTITY_HOST = 1,      /* this node: always allowed into its pods */
	CILIATE_IDENTITY_WORLD = 2,     /* no ipcache prefix matches */
};

/* Source files that can raise a drop; events carry the id and the line.
 * Each id maps to a file name: enumerator name lowercased, the last '_'
 * turned into '.', prefix dropped (CILIATE_SRC_BPF_LXC_C is bpf_lxc.c). */
enum ciliate_source {
	CILIATE_SRC_UNKNOWN = 0,
	CILIATE_SRC_BPF_LXC_C = 1,
	CILIATE_SRC_BPF_HOST_C = 2,
	CILIATE_SRC_BPF_UPLINK_C = 3,
	CILIATE_SRC_ETH_H = 4,
	CILIATE_SRC_IPV4_H = 5,
	CILIATE_SRC_ARP_H = 6,
	CILIATE_SRC_LXC_H = 7,
	CILIATE_SRC_FORWARD_H = 8,
	CILIATE_SRC_POLICY_H = 9,
	CILIATE_SRC_CONNTRACK_H = 10,
	CILIATE_SRC_LB_H = 11,
};

/* ciliate_ipcache (LPM trie): prefix -> who owns it. */
struct ciliate_ipcache_key {
	__u32 prefixlen;        /* LPM trie keys start with the prefix length */
	__u32 addr;             /* IPv4, network byte order */
};

#define CILIATE_IPCACHE_F_LOCAL 1      /* a pod CIDR of this node */

struct ciliate_ipcache_value {
	__u32 identity;
	__u32 node_ip;          /* owner node, network byte order; 0 = this node */
	__u32 flags;            /* CILIATE_IPCACHE_F_* */
	__u32 pad;
};

/*
 * The value of both endpoint maps, which are arrays (a hash lookup costs
 * more than the rest of the fast path together):
 *   ciliate_ep_ip:  endpoint slot -> endpoint, where the slot is the pod
 *                   IP's position in the node's pod CIDRs (endpoint_slot());
 *   ciliate_ep_dev: host-side veth ifindex -> endpoint; the agent creates
 *                   pod veths with ifindexes below the map's size.
 * A slot whose ifindex is 0 is empty.
 */
struct ciliate_endpoint {
	__u32 ifindex;          /* host-side veth (lxc...); 0 = empty slot */
	__u32 ipv4;             /* pod IPv4, network byte order */
	__u32 identity;
	__u16 endpoint_id;
	__u16 flags;
	__u8 mac[6];            /* the pod's eth0 */
	__u8 node_mac[6];       /* the host-side veth: the pod's gateway MAC */
};

/* ciliate_sockhash: the TCP sockets of local pods talking to each other,
 * by their 4-tuple as the socket sees it. */
struct ciliate_sock_key {
	__u32 local_ip;         /* network byte order */
	__u32 remote_ip;        /* network byte order */
	__u32 local_port;       /* host byte order */
	__u32 remote_port;      /* host byte order */
};

/* ciliate_sock_state (socket storage): how a pod socket sends. */
#define CILIATE_SOCK_F_STACK 1  /* sticks to the TCP stack: its first bytes went that way */

struct ciliate_sock_state {
	__u32 flags;
	__u32 pad;
};

/* ciliate_metrics (per-CPU array): index reason * 2 + direction. */
struct ciliate_metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* ciliate_config (array, one entry): knobs that change at run time. */
#define CILIATE_CONFIG_F_TRACE 1        /* send a trace event for every forwarded packet */

struct ciliate_runtime_config {
	__u32 flags;
	__u32 pad;
};

/*
 * ciliate_policy (LPM trie): one entry per (endpoint, direction, peer
 * identity, protocol, port block). The trie matches the bytes after
 * prefixlen from the first bit on, so every field is in network byte order
 * and the fields that may be wildcarded come last: an entry's prefix always
 * covers endpoint, direction and identity (CILIATE_POLICY_PREFIX_FIXED
 * bits), then the protocol (8 bits, absent = any protocol), then the
 * leading bits of the port (absent = any port; a range is split into
 * aligned blocks, one entry each). Identity 0 entries apply to any peer
 * and are looked up second. The direction byte also carries the entries'
 * generation, so a new policy is written beside the live one and switched
 * on with one write of the endpoint's state.
 */
#define CILIATE_POLICY_PREFIX_FIXED 56  /* identity, endpoint id, direction */
#define CILIATE_POLICY_PREFIX_PROTO 64  /* ... + protocol */
#define CILIATE_POLICY_PREFIX_FULL 80   /* ... + port */
#define CILIATE_POLICY_DIR_GENERATION 2 /* direction byte: bit 0 direction, bit 1 generation */

struct ciliate_policy_key {
	__u32 prefixlen;
	__u32 identity;         /* peer identity, network byte order; 0 = any peer */
	__u16 endpoint_id;      /* network byte order */
	__u8 direction;         /* enum ciliate_direction | generation */
	__u8 protocol;          /* IPPROTO_*; 0 = any (prefix stops before it) */
	__u16 dport;            /* network byte order */
	__u16 pad;
};

#define CILIATE_POLICY_F_DENY 1         /* deny wins over any allow */

struct ciliate_policy_value {
	__u32 flags;            /* CILIATE_POLICY_F_* */
};

/* ciliate_policy_state (array by endpoint id): whether policy applies. A
 * direction that no policy selects is not enforced: everything passes. */
#define CILIATE_POLICY_INGRESS 1        /* ingress enforced */
#define CILIATE_POLICY_EGRESS 2         /* egress enforced */
#define CILIATE_POLICY_GENERATION 4     /* entries of generation 1 are live (else 0) */

struct ciliate_policy_state {
	__u32 flags;            /* CILIATE_POLICY_* */
	__u32 revision;         /* bumped on every change; 0 = never had policy */
};

/*
 * ciliate_ct_v2 (array of sets): the connection tracker, a set-associative
 * table. A connection hashes to one set of CILIATE_CT_WAYS entries (the
 * hash is symmetric: both directions land in the same set); a new
 * connection takes a free or expired way, else the way that expires
 * first. An array rather than a hash map: its lookup is inlined, and the
 * established path of a flow must cost little more than forwarding
 * (bench: an LRU hash lookup alone doubled the local delivery path).
 *
 * One entry per connection, found from either direction: the key is the
 * tuple of the packet that opened it, and a packet matching it reversed
 * is a reply. Entries carry the policy revision of each local end and the
 * identity of each end when the connection was last verified; a packet
 * finding one that moved (a policy change, a label change) re-checks the
 * policy. An all-zero key is a free way. (v1, ciliate_ct, keyed the two
 * ends in address order with a flag naming the opener.)
 */
#define CILIATE_CT_WAYS 4

struct ciliate_ct_key {
	__u32 saddr;            /* the opener's address, network byte order */
	__u32 daddr;
	__u16 sport;            /* network byte order; ICMP echo: the id, dport 0 */
	__u16 dport;
	__u8 protocol;
	__u8 pad[3];
};

#define CILIATE_CT_F_ORIG_HI 1          /* unused (v1: opened from the key's second end) */
#define CILIATE_CT_F_SEEN_REPLY 2       /* the other end has answered */
#define CILIATE_CT_F_CLOSING 4          /* TCP FIN or RST seen */

/* Lifetimes (seconds) of an entry after its last packet, Cilium's values. */
#define CILIATE_CT_LIFETIME_TCP 21600   /* established TCP */
#define CILIATE_CT_LIFETIME_SYN 60      /* TCP not answered yet */
#define CILIATE_CT_LIFETIME_CLOSE 10    /* TCP after FIN or RST */
#define CILIATE_CT_LIFETIME_NONTCP 60   /* UDP, ICMP echo, others */

/*
 * An entry is 64 bytes (a set 256: the array's index scales by a shift).
 * What it verified is kept twice, as each direction's packets see their
 * two ends (sender first), so a packet compares two 64-bit words with no
 * swapping: the opener's packets against orig_revision.., replies against
 * swapped.
 */
struct ciliate_ct_entry {
	struct ciliate_ct_key key;      /* all zero: a free way */
	__u64 expires;          /* jiffies after which the entry is dead */
	__u32 flags;            /* CILIATE_CT_F_* */
	__u32 lifetime;         /* jiffies: what its flags give it (see ct_lifetime()) */
	__u32 orig_revision;    /* opener's policy revision when verified (local opener) */
	__u32 reply_revision;   /* other end's policy revision when verified (local) */
	__u32 orig_identity;    /* opener's identity when verified */
	__u32 reply_identity;   /* other end's identity when verified */
	__u32 swapped[4];       /* reply_, orig_revision, reply_, orig_identity: as replies see them */
};

struct ciliate_ct_set {
	struct ciliate_ct_entry way[4];  /* CILIATE_CT_WAYS */
};

/*
 * ciliate_frag (LRU hash): the ports of a fragmented IPv4 datagram, as
 * Cilium keeps them (bpf/lib/ipv4.h). Only the first fragment carries the
 * L4 header; it records its ports under the datagram's identity (both
 * addresses, protocol, IP id) and the later fragments, which carry none,
 * are tracked and judged with them.
 */
struct ciliate_frag_key {
	__u32 saddr;            /* network byte order */
	__u32 daddr;
	__u16 id;               /* IP identification, network byte order */
	__u8 protocol;
	__u8 pad;
};

struct ciliate_frag_ports {
	__u16 sport;            /* network byte order; ICMP echo: as in ciliate_ct_key */
	__u16 dport;
};

/* ciliate_events (ring buffer): one record per drop, trace or policy
 * verdict; service translations have a record of their own
 * (ciliate_lb_event), told apart by the type byte both start with. */
struct ciliate_event {
	__u8 type;              /* enum ciliate_event_type */
	__u8 reason;            /* drop reason or trace point */
	__u8 direction;         /* enum ciliate_direction (of the policy, for policy records) */
	__u8 source;            /* enum ciliate_source of the drop site */
	__u16 line;             /* line of the drop site */
	__u16 cap_len;          /* bytes of the packet copied into data */
	__u32 ifindex;          /* device the program runs on */
	__u32 target_ifindex;   /* redirect target, 0 if none */
	__u32 orig_len;         /* packet length */
	__u32 src_identity;     /* policy: the sender's identity (0 = not looked up) */
	__u32 dst_identity;     /* policy: the receiver's identity */
	__u16 dport;            /* policy: destination port, host byte order */
	__u8 protocol;          /* policy: IPPROTO_* */
	__u8 pad;
	__u64 ktime_ns;
	__u8 data[64];          /* CILIATE_EVENT_CAPTURE_LEN: packet start */
};

/*
 * ---- Services: load balancing (feature `services`) ----
 *
 * Cilium's shape (bpf/lib/lb.h): a frontend (address, port, protocol) has
 * one entry per slot in ciliate_lb_service. Slot 0 is the service itself
 * (how many active backends, flags, affinity timeout, its rev-NAT id);
 * slots 1..count hold the ids of its active backends, and the slots after
 * count its terminating ones (kept so the control plane can list them; no
 * new flow picks them). Picking a backend is one lookup of a slot chosen
 * at random (in-cluster) or through the service's Maglev table (from
 * outside), then one lookup of the backend id: the cost does not depend on
 * the number of services or backends.
 */
#define CILIATE_LB_MAGLEV_SIZE 1021     /* M: entries of one Maglev table, a prime */

#define CILIATE_LB_SCOPE_EXTERNAL 0     /* the default entry of a frontend */
#define CILIATE_LB_SCOPE_INTERNAL 1     /* in-cluster clients, when the service has two scopes */

struct ciliate_lb_service_key {
	__u32 addr;             /* frontend IPv4, network byte order */
	__u16 dport;            /* network byte order */
	__u16 slot;             /* 0: the service; n: its n-th backend */
	__u8 protocol;          /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 scope;             /* CILIATE_LB_SCOPE_* */
	__u8 pad[2];
};

#define CILIATE_LB_F_EXTERNAL 1         /* NodePort, LoadBalancer or external IP: balanced on the uplink too */
#define CILIATE_LB_F_AFFINITY 2         /* sessionAffinity ClientIP */
#define CILIATE_LB_F_TWO_SCOPES 4       /* in-cluster clients use the CILIATE_LB_SCOPE_INTERNAL entries */

struct ciliate_lb_service_value {
	__u32 backend_id;       /* slot n: the backend (ciliate_lb_backend); slot 0: 0 */
	__u16 count;            /* slot 0: active backends, in slots 1..count */
	__u16 rev_nat_id;       /* the service's id (ciliate_lb_revnat, ciliate_lb_maglev) */
	__u32 affinity_timeout; /* slot 0: seconds a client keeps its backend (CILIATE_LB_F_AFFINITY) */
	__u16 flags;            /* slot 0: CILIATE_LB_F_* */
	__u16 terminating;      /* slot 0: terminating backends, in the slots after count */
};

#define CILIATE_LB_BACKEND_ACTIVE 0
#define CILIATE_LB_BACKEND_TERMINATING 1        /* keeps its flows, takes no new one */

#define CILIATE_LB_BACKEND_F_LOCAL 1    /* a pod of this node */

/* ciliate_lb_backend (hash): backend id -> where it is. */
struct ciliate_lb_backend {
	__u32 addr;             /* network byte order */
	__u16 port;             /* network byte order */
	__u8 state;             /* CILIATE_LB_BACKEND_* */
	__u8 flags;             /* CILIATE_LB_BACKEND_F_* */
};

/* ciliate_lb_revnat (hash): rev-NAT id -> the frontend, for translating back. */
struct ciliate_lb_revnat {
	__u32 addr;             /* network byte order */
	__u16 port;             /* network byte order */
	__u16 pad;
};

/* ciliate_lb_affinity (LRU hash): who keeps which backend. A client is an
 * IP (per-packet path), a network namespace (sockets: all sockets of one
 * pod are one client, as Cilium does) or one socket (unconnected UDP
 * sends of one socket keep one backend). */
#define CILIATE_LB_AFFINITY_CLIENT_IP 0
#define CILIATE_LB_AFFINITY_NETNS 1
#define CILIATE_LB_AFFINITY_SOCKET 2

struct ciliate_lb_affinity_key {
	__u64 client;           /* IPv4 (network byte order) or a netns or socket cookie */
	__u16 rev_nat_id;
	__u8 kind;              /* CILIATE_LB_AFFINITY_* */
	__u8 pad[5];
};

struct ciliate_lb_affinity_value {
	__u64 last_used;        /* seconds of CLOCK_MONOTONIC */
	__u32 backend_id;
	__u32 pad;
};

/* ciliate_lb_sock_revnat (LRU hash): an unconnected UDP socket that socket
 * LB sent to a backend -> the frontend, so recvmsg shows the service. */
struct ciliate_lb_sock_key {
	__u64 cookie;           /* socket cookie */
	__u32 addr;             /* backend, network byte order */
	__u16 port;             /* backend, network byte order */
	__u16 pad;
};

struct ciliate_lb_sock_value {
	__u32 addr;             /* frontend, network byte order */
	__u16 port;             /* frontend, network byte order */
	__u16 rev_nat_id;
};

/* ciliate_lb_sock_peer (socket storage): the service a connect() was
 * translated from, kept on the socket itself: a connected socket has one
 * peer, and the record goes with the socket (no hash update per connect,
 * no LRU entry outliving its socket). Unconnected UDP sends, which may
 * reach several backends, keep using ciliate_lb_sock_revnat. */
struct ciliate_lb_sock_peer {
	__u32 frontend_addr;    /* network byte order; 0: none */
	__u32 backend_addr;     /* network byte order */
	__u16 frontend_port;    /* network byte order */
	__u16 backend_port;     /* network byte order */
	__u16 rev_nat_id;
	__u16 pad;
};

/*
 * Per-packet load balancing on the uplink (NodePort, LoadBalancer and
 * external IPs from outside): one flow keeps its backend and its SNAT port
 * through ciliate_lb_nat_fwd_v2, keyed by the tuple as it arrived; replies
 * are translated back through ciliate_lb_nat_rev, keyed by the tuple of
 * the reply as the node sees it (from a local backend pod, or from a
 * remote backend to this node's SNAT port).
 */
struct ciliate_lb_tuple {
	__u32 saddr;            /* network byte order */
	__u32 daddr;
	__u16 sport;            /* network byte order */
	__u16 dport;
	__u8 protocol;
	__u8 pad[3];
};

/* ciliate_lb_nat_fwd_v2 (LRU hash): a flow as it arrived -> its backend,
 * SNAT port and state. A flow is dead after `expires` (a TCP flow closed by
 * FIN both ways or by RST lives CILIATE_CT_LIFETIME_CLOSE more seconds): a
 * packet of a dead flow starts a new one, its reply entry and SNAT port are
 * taken back, and user space frees dead flows (LoadBalancer.expire_flows).
 * Lifetimes are the conntrack's (CILIATE_CT_LIFETIME_*); time is jiffies. */
#define CILIATE_LB_FLOW_F_SEEN_REPLY 1  /* the backend answered */
#define CILIATE_LB_FLOW_F_FIN_ORIG 2    /* the client sent FIN */
#define CILIATE_LB_FLOW_F_FIN_REPLY 4   /* the backend sent FIN */
#define CILIATE_LB_FLOW_F_CLOSING 8     /* FIN both ways or RST: short lifetime */

struct ciliate_lb_flow {
	__u64 expires;          /* jiffies after which the flow is dead */
	__u32 backend_id;
	__u16 nat_port;         /* SNAT source port (network byte order); 0: not SNATed (local backend) */
	__u16 flags;            /* CILIATE_LB_FLOW_F_* */
};

/* The addresses and ports a reply gets. */
struct ciliate_lb_nat_rev {
	__u32 saddr;            /* the frontend */
	__u32 daddr;            /* the client */
	__u16 sport;
	__u16 dport;
};

#define CILIATE_LB_NAT_PORT_MIN 61000   /* SNAT ports: above Linux's default ephemeral range */
#define CILIATE_LB_NAT_PORT_MAX 65535

/* What a service translation did (trace events, metrics). */
enum ciliate_lb_xlate {
	CILIATE_LB_XLATE_LOCAL = 1,     /* to a backend on this node (DNAT) */
	CILIATE_LB_XLATE_REMOTE = 2,    /* to a backend on another node (DNAT, SNAT to this node) */
	CILIATE_LB_XLATE_REPLY = 3,     /* a reply given the service back */
	CILIATE_LB_XLATE_SOCKET = 4,    /* a socket's connect or send to a backend */
};

/* ciliate_events record of a service translation, sent while tracing is on
 * (CILIATE_CONFIG_F_TRACE, as trace and policy records). */
struct ciliate_lb_event {
	__u8 type;              /* CILIATE_EVENT_LB */
	__u8 kind;              /* enum ciliate_lb_xlate */
	__u8 direction;         /* enum ciliate_direction */
	__u8 pad;
	__u16 rev_nat_id;       /* the service; 0: not known (replies) */
	__u16 pad2;
	__u32 ifindex;          /* device of the packet; 0: a socket */
	__u32 backend_id;       /* 0: not known (replies) */
	struct ciliate_lb_tuple orig;   /* as it came (a socket: the address it asked for) */
	struct ciliate_lb_tuple xlated; /* as it went on */
	__u64 ktime_ns;
};

/* ciliate_lb_maglev (hash): rev-NAT id -> the service's Maglev lookup
 * table, CILIATE_LB_MAGLEV_SIZE backend ids (computed in user space). */
struct ciliate_lb_maglev {
	__u32 backend_ids[1021]; /* CILIATE_LB_MAGLEV_SIZE */
};

/* ciliate_throttle (array): endpoint slot -> the pod's egress bandwidth
 * (kubernetes.io/egress-bandwidth), kept on the uplink's egress (edt.h):
 * paced by the departure time each packet gets (EDT), which the fq qdisc
 * there keeps; or, on a kernel without fq, shaped by the pod's own class of
 * an htb qdisc there, which the program names in skb->priority. */
struct ciliate_throttle {
	__u64 rate;             /* bytes per second; 0: no limit */
	__u64 t_last;           /* departure time of its last packet (ns, CLOCK_MONOTONIC) */
	__u64 horizon;          /* ns: a packet due later than this from now is dropped */
	__u32 classid;          /* htb class (major:minor) that shapes it; 0: paced */
	__u32 pad;
};

#endif /* CILIATE_ABI_H */
