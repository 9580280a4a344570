// Constants shared by the kernels and the Python side, defined once: src/epkern/kernel_constants.py parses this
// file (the Python modules take their values from there, never from a copy).
//
// Form (the parser accepts nothing else): blank lines, `//` comments, `#pragma once`, and one definition per line,
//   constexpr int EPK_NAME = <expression>;  // optional comment
// where <expression> uses decimal or hex integers, + - * <<, parentheses and names defined above it.
#pragma once

// ---- HT (intranode high-throughput) ----
constexpr int EPK_CTRL_BYTES = 1 << 17;         // control area at the start of every rank's symmetric region
constexpr int EPK_HT_MAX_PEERS = 8;             // ranks reached by IPC in the HT kernels
constexpr int EPK_HT_MAX_LOCAL_EXPERTS = 1024;  // per rank (ht_notify's per-expert counts)
constexpr int EPK_ERROR_RECORD_BYTES = 32;      // sizeof(epk::ErrorRecord), host-mapped
// ht_notify's host words (int32 indices of host_out): counts, then what the host checks before dispatching
constexpr int EPK_HT_NOTIFY_SHAPE = 2 + EPK_HT_MAX_PEERS + EPK_HT_MAX_LOCAL_EXPERTS;  // peer+1 (0: all agree), field
constexpr int EPK_HT_NOTIFY_BAD_INDEX = EPK_HT_NOTIFY_SHAPE + 4;  // 1 + flat index of a bad topk_idx entry, its value
constexpr int EPK_HT_NOTIFY_WORDS = EPK_HT_NOTIFY_BAD_INDEX + 2;
constexpr int EPK_HT_SHAPE_FIELDS = 5;  // row bytes, top-k, FP8 scale columns, experts per rank, topk_idx valid
// byte offset of HtCtrl::epoch_counter in the control area (ht_common.cuh): after the notify slots and the flags
constexpr int EPK_HT_CTRL_COUNTER_AT =
    4 * (2 * EPK_HT_MAX_PEERS * (1 + EPK_HT_MAX_PEERS + EPK_HT_MAX_LOCAL_EXPERTS + EPK_HT_SHAPE_FIELDS + 4));

// ---- HT across nodes (issue #18; kernels/ht_inter.cuh) ----
constexpr int EPK_HT_INTER_MAX_RANKS = 128;  // ranks of a group across nodes (at most EPK_HT_MAX_PEERS per node)
constexpr int EPK_HT_INTER_MAX_NODES = 16;
constexpr int EPK_HT_INTER_SHAPE_FIELDS = EPK_HT_SHAPE_FIELDS + 1;  // + num_tokens_per_rdma_rank consistent (1: yes)
// ht_inter_notify's host words: [0] the host's call number, [1] rows received, [2, 2 + MAX_RANKS) rows from each
// source, then the selections per local expert, the shape check (4), the bad index (2), per node the messages sent then
// forwarded, and whether num_tokens_per_rdma_rank agrees (1)
constexpr int EPK_HT_INTER_OUT_EXPERTS = 2 + EPK_HT_INTER_MAX_RANKS;
constexpr int EPK_HT_INTER_OUT_SHAPE = EPK_HT_INTER_OUT_EXPERTS + EPK_HT_MAX_LOCAL_EXPERTS;
constexpr int EPK_HT_INTER_OUT_BAD_INDEX = EPK_HT_INTER_OUT_SHAPE + 4;
constexpr int EPK_HT_INTER_OUT_NODES = EPK_HT_INTER_OUT_BAD_INDEX + 2;
constexpr int EPK_HT_INTER_OUT_LAYOUT_OK = EPK_HT_INTER_OUT_NODES + 2 * EPK_HT_INTER_MAX_NODES;
constexpr int EPK_HT_NOTIFY_OUT_WORDS = EPK_HT_INTER_OUT_LAYOUT_OK + 1;  // host_out's int32 words (both notifies)
// sizeof(inter::NotifyEntry): flag + padding, rows, shape, node_msgs, padding, experts
constexpr int EPK_HT_INTER_ENTRY_BYTES =
    64 + 4 * (EPK_HT_INTER_MAX_RANKS + 8 + EPK_HT_INTER_MAX_NODES + 8) + 4 * EPK_HT_MAX_LOCAL_EXPERTS;
constexpr int EPK_HT_INTER_WORDS_BYTES = 8 * 8 * EPK_HT_INTER_MAX_NODES;  // the area's u64 stream words
constexpr int EPK_HT_INTER_HEADER_BYTES =
    EPK_HT_INTER_WORDS_BYTES + 4 * EPK_HT_INTER_MAX_RANKS * EPK_HT_INTER_ENTRY_BYTES;
constexpr int EPK_HT_INTER_MSG_HEADER = 16;  // a dispatch message: seq u32, token i32, 0, 0; then its row slots

// ---- LL (low-latency) limits ----
constexpr int EPK_LL_MAX_NUM_MAX = 1024;  // tokens per rank: the count field of a signal has 11 bits
constexpr int EPK_LL_MAX_TOPK = 32;
constexpr int EPK_LL_MAX_EXPERTS = 8192;
constexpr int EPK_LL_MAX_RANKS = 32;  // one lane per source rank in the dispatch's receive phase
constexpr int EPK_LL_THREADS = 512;   // threads per block of both LL kernels
constexpr int EPK_LL_MAX_SELECTIONS = EPK_LL_MAX_NUM_MAX * EPK_LL_MAX_TOPK;  // num_max * top-k at most

// ---- LL device state (int32 words of the Buffer's state array) ----
constexpr int EPK_STATE_MAX_RANKS = 1024;    // entries of the per-peer arrays (words 8..63 are unused)
constexpr int EPK_STATE_COUNTER = 0;         // seq of the last call that sent
constexpr int EPK_STATE_TICKET = 1;          // blocks of the running sending kernel that finished
constexpr int EPK_STATE_PROXY_FIFOS = 2;     // PROXY route: number of trigger FIFOs (0: no PROXY route)
constexpr int EPK_STATE_PROXY_CAPACITY = 3;  // PROXY route: records per FIFO (a power of two)
constexpr int EPK_STATE_PROXY_TABLE = 4;     // words 4-5: u64 device address of the FIFO table (ll_route.cuh)
constexpr int EPK_PROXY_MAX_FIFOS = 64;      // entries of the FIFO table: [base of FIFO i] then [its head word]
constexpr int EPK_STATE_RDMA_TABLE = 6;      // words 6-7: u64 device address of the RDMA QP table (ll_route.cuh)
constexpr int EPK_RDMA_QP_BYTES = 64;        // one entry of that table (epk::RdmaQp), indexed by peer
constexpr int EPK_STATE_MASK = 64;           // [STATE_MAX_RANKS]: 1 = peer masked (skipped at every send and wait)
constexpr int EPK_STATE_ROUTE = EPK_STATE_MASK + EPK_STATE_MAX_RANKS;  // [STATE_MAX_RANKS]: route kind of each peer
constexpr int EPK_STATE_SLOT = EPK_STATE_ROUTE + EPK_STATE_MAX_RANKS;  // [LL_MAX_EXPERTS]: dispatch slot allocator
constexpr int EPK_STATE_DONE = EPK_STATE_SLOT + EPK_LL_MAX_EXPERTS;    // [LL_MAX_EXPERTS]: dispatch puts finished
constexpr int EPK_STATE_PAIR = EPK_STATE_DONE + EPK_LL_MAX_EXPERTS;    // [LL_MAX_EXPERTS]: combine warps per (e, src)
constexpr int EPK_STATE_BEGIN = EPK_STATE_PAIR + EPK_LL_MAX_EXPERTS;   // direct dispatch: begin of this rank's block
constexpr int EPK_STATE_BEGIN_TAG = EPK_STATE_BEGIN + EPK_LL_MAX_EXPERTS;    // ... and the seq once published
constexpr int EPK_STATE_SLOT_OF = EPK_STATE_BEGIN_TAG + EPK_LL_MAX_EXPERTS;  // [LL_MAX_SELECTIONS]: slot in block
constexpr int EPK_STATE_WORDS = EPK_STATE_SLOT_OF + EPK_LL_MAX_SELECTIONS;

// ---- LL route kinds (per peer, in the device state) ----
constexpr int EPK_ROUTE_NONE = 0;
constexpr int EPK_ROUTE_IPC = 1;
constexpr int EPK_ROUTE_PROXY = 2;  // host FIFO + proxy thread (ll_route.cuh)
constexpr int EPK_ROUTE_RDMA = 3;   // GPU-written WQEs, the NIC polls the doorbell (ll_route.cuh)

// ---- LL launch phases (bit mask: the `phase` argument of both LL kernels) ----
constexpr int EPK_PHASE_SEND = 1;
constexpr int EPK_PHASE_RECV = 2;

// ---- codes of an error record (ErrorRecord.code) ----
constexpr int EPK_ERR_CODE_TIMEOUT = 1;    // a peer did not answer within the deadline
constexpr int EPK_ERR_CODE_BAD_INDEX = 2;  // an index or shape a kernel refused
constexpr int EPK_ERR_CODE_OVERFLOW = 3;   // more rows than the destination has

// ---- phases of an error record (ErrorRecord.phase) ----
constexpr int EPK_ERR_PHASE_HT_NOTIFY = 1;             // notify: waiting for a peer's counts
constexpr int EPK_ERR_PHASE_HT_DISPATCH_ADDRS = 2;     // dispatch: waiting for a peer's output addresses
constexpr int EPK_ERR_PHASE_HT_DISPATCH_DONE = 3;      // dispatch: waiting for a peer to finish sending
constexpr int EPK_ERR_PHASE_HT_COMBINE_ADDRS = 4;      // combine: waiting for a peer's input addresses
constexpr int EPK_ERR_PHASE_HT_COMBINE_DONE = 5;       // combine: waiting for a peer to finish reading
constexpr int EPK_ERR_PHASE_HT_DISPATCH_OVERFLOW = 6;  // dispatch: a destination has fewer rows than tokens sent
constexpr int EPK_ERR_PHASE_LL_DISPATCH_RECV = 7;      // LL dispatch: waiting for a peer's token count
constexpr int EPK_ERR_PHASE_LL_LOCAL_SENDS = 8;        // LL dispatch: waiting for this rank's own puts (a bug)
constexpr int EPK_ERR_PHASE_LL_COMBINE_RECV = 9;       // LL combine: waiting for a peer's expert outputs
constexpr int EPK_ERR_PHASE_LL_BAD_INDEX = 10;         // LL dispatch: a topk_idx entry outside [-1, num_experts)
constexpr int EPK_ERR_PHASE_LL_BAD_HANDLE = 11;        // LL combine: a layout_range / src_info entry out of range
constexpr int EPK_ERR_PHASE_LL_ROUTE = 12;             // LL: a peer's route kind is not implemented
constexpr int EPK_ERR_PHASE_LL_OVERFLOW = 13;          // LL dispatch: more selections of one expert than num_max
constexpr int EPK_ERR_PHASE_HT_SHAPE = 14;             // dispatch: a destination's call has other shapes
constexpr int EPK_ERR_PHASE_HT_INTER_ORDER = 15;       // across nodes: a ring slot holds another message than due
constexpr int EPK_ERR_PHASE_HT_INTER_SPACE = 0x701;    // across nodes: waiting for a forwarder's credit (ht_stream.cuh)
constexpr int EPK_ERR_PHASE_HT_INTER_ARRIVAL = 0x702;  // across nodes: waiting for a peer's messages (ht_stream.cuh)
