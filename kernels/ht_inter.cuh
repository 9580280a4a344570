// HT across nodes (issue #18; docs/architecture.md, "Internode HT"): the layout of a rank's HT RDMA area, the node
// map, the messages, the QP table entry and the block-level stream ends, shared by the ht_inter_*.cu kernels.
// Mirrored by src/epkern/gpu/ht_inter_layout.py and tests/ht_inter_kernel_model.py. Limits: at most kMaxPeers (8)
// ranks per node (IPC and HtCtrl are indexed by local index), kMaxNodes nodes, kMaxRanks ranks.
//
// Area (registered on this rank's HT NIC; peers of other nodes WRITE into it, peers of this node store into it over
// IPC): the stream words, the notify entries, then two halves of rings, dispatch then combine; each half holds per
// node n a receive ring (messages from the rank of node n with this rank's local index) and a staging ring (this
// rank's messages to that rank), `ring` slots of `msg` bytes each.
#pragma once

#include "epk_common.cuh"
#include "epk_constants.cuh"
#include "ht_common.cuh"
#include "ht_stream.cuh"

namespace epk {
namespace inter {

constexpr int kMaxNodes = EPK_HT_INTER_MAX_NODES;
constexpr int kMaxRanks = EPK_HT_INTER_MAX_RANKS;
constexpr int kShapeFields = EPK_HT_INTER_SHAPE_FIELDS;
constexpr int kSlotsPerMsg = kMaxPeers;  // a message lists a row slot for each rank of the destination node

// One rank's counts for one receiver: written by the source into the receiver's area (IPC stores, or one RDMA
// WRITE of everything after `flag` and then the flag as an inline WRITE). Doubled by notify epoch parity.
struct NotifyEntry {
  int flag;                  // epoch of the notify that wrote it; written last
  int pad0[15];              // the body starts at byte 64 (ht_inter_notify.cu WRITEs it apart from the flag)
  int rows[kMaxRanks];       // rows the source sends each rank
  int shape[8];              // the source's call shapes (kShapeFields used)
  int node_msgs[kMaxNodes];  // messages the source sends each node: its tokens with a destination there
  int pad1[8];
  int experts[kMaxLocalExperts];  // selections the source sends each of the receiver's local experts
};
static_assert(sizeof(NotifyEntry) == EPK_HT_INTER_ENTRY_BYTES, "NotifyEntry layout is shared with the host");

// Stream words: u64 counters that only grow over the Buffer's life (so nothing is reset between calls).
struct Words {
  unsigned long long tail[kMaxNodes];        // dispatch: messages arrived from node n (WRITTEN by its sender)
  unsigned long long credit[kMaxNodes];      // dispatch: messages node n's forwarder is done with (WRITTEN by it)
  unsigned long long sent[kMaxNodes];        // dispatch: messages this rank sent to node n in earlier calls
  unsigned long long received[kMaxNodes];    // dispatch: messages this rank forwarded from node n in earlier calls
  unsigned long long c_tail[kMaxNodes];      // combine: partials arrived from node n's forwarder
  unsigned long long c_credit[kMaxNodes];    // combine: partials node n's source is done with
  unsigned long long c_sent[kMaxNodes];      // combine: partials this rank sent back to node n in earlier calls
  unsigned long long c_received[kMaxNodes];  // combine: partials this rank consumed from node n in earlier calls
};
static_assert(sizeof(Words) == EPK_HT_INTER_WORDS_BYTES, "Words layout is shared with the host");

struct Area {
  Words words;
  NotifyEntry entry[2][kMaxRanks];  // [parity][source]
  NotifyEntry stage[2][kMaxRanks];  // [parity][destination of another node]: this rank's entries before their WRITE
};
static_assert(sizeof(Area) == EPK_HT_INTER_HEADER_BYTES, "Area layout is shared with the host");

// The rings of one half (dispatch or combine): where they start in the area, slots per ring and bytes per slot.
struct Rings {
  long long offset;  // bytes from the area's start
  int ring, msg;
  EPK_DEVICE long long recv_at(int node, uint64_t pos) const {  // receive ring from `node`, slot pos % ring
    return offset + (2ll * node * ring + static_cast<long long>(pos % ring)) * msg;
  }
  EPK_DEVICE long long stage_at(int node, uint64_t pos) const {  // staging ring to `node`
    return offset + ((2ll * node + 1) * ring + static_cast<long long>(pos % ring)) * msg;
  }
};

// The group's nodes as the host gives them (device int arrays: the node of each rank; the rank of each node with
// this rank's local index, this rank for its own node), copied by every block into shared memory (load_nodes).
template <int kRanks, int kNodes>
struct Nodes {
  int node_of[kRanks];
  int peer_of[kNodes];
  int rank_at[kNodes][kSlotsPerMsg];  // the rank of local index j of node n (-1 past the node's ranks)
  int my_node, my_index, per_node;    // this rank's node and local index; ranks per node
  EPK_DEVICE int node(int r) const { return node_of[r]; }
  EPK_DEVICE int peer(int n) const { return peer_of[n]; }
  EPK_DEVICE int local(int j) const { return rank_at[my_node][j]; }  // the rank of this node's local index j
};

// One QP table entry (the host packs it: gpu/ll/rdma.py pack_qp, the layout of ll_route.cuh's RdmaQp): the stream's
// poster view and the peer's area base as the QP's remote addresses name it.
struct QpEntry {
  uint8_t *sq;
  uint32_t *dbrec;
  unsigned long long *db;
  const unsigned long long *retired;
  unsigned long long *ctr;
  unsigned long long raddr;
  uint32_t rkey, lkey;
  uint32_t qpn, wqe_cnt;
  EPK_DEVICE stream::Qp qp() const { return stream::Qp{sq, dbrec, db, retired, ctr, qpn, wqe_cnt, lkey, rkey}; }
};
static_assert(sizeof(QpEntry) == EPK_RDMA_QP_BYTES, "QpEntry layout is shared with gpu/ll/rdma.py");

// A dispatch message: header {seq u32, token i32, 0, 0}, kSlotsPerMsg row slots (−1: not for that rank of the
// node), K expert ids i32 (global), K weights f32, the FP8 scales f32, padding to 16 bytes, then the row.
EPK_DEVICE constexpr int dispatch_meta_bytes(int topk, int scale_cols) {
  return (EPK_HT_INTER_MSG_HEADER + 4 * kSlotsPerMsg + 8 * topk + 4 * scale_cols + 15) / 16 * 16;
}

#ifdef __CUDACC__
// Fill the block's Nodes (shared) from the host's arrays; every thread calls; synced before it returns.
template <int kRanks, int kNodes>
EPK_DEVICE void load_nodes(Nodes<kRanks, kNodes> &s, const int *node_of, const int *peer_of_node, int rank) {
  for (int r = threadIdx.x; r < kRanks; r += blockDim.x) s.node_of[r] = node_of[r];
  for (int n = threadIdx.x; n < kNodes; n += blockDim.x) s.peer_of[n] = peer_of_node[n];
  __syncthreads();
  if (threadIdx.x == 0) {
    s.my_node = s.node_of[rank];
    for (int n = 0; n < kNodes; ++n) {
      int j = 0;
      for (int r = 0; r < kRanks; ++r)
        if (s.node_of[r] == n) {
          if (r == rank) s.my_index = j;
          s.rank_at[n][j++] = r;
        }
      if (n == s.my_node) s.per_node = j;
      for (; j < kSlotsPerMsg; ++j) s.rank_at[n][j] = -1;
    }
  }
  __syncthreads();
}

// A stream word's offset in the area: the same in every rank's area, so the peer's word as the QP addresses it.
EPK_DEVICE uint64_t offset_in(const Area *area, const unsigned long long *word) {
  return static_cast<uint64_t>(reinterpret_cast<const char *>(word) - reinterpret_cast<const char *>(area));
}

// One stream of this call's `count` messages between this rank and the rank `peer` of node `n` (ht_stream.cuh), as
// a block drives either end of it. Counters of earlier calls: `done` (this rank's sent / received word). Messages
// of a call start once every earlier one is done with (credit >= done), so the ring restarts empty.
struct StreamEnd {
  const QpEntry &q;
  Area *area;
  Rings rings;
  int n, my_node, peer, count, chunk;
  unsigned long long *done;
  const Deadline &deadline;
};

// Sender: per chunk, wait for ring space (`credit`, WRITTEN by the peer), `stage(i, seq, slot)` for each message
// (a warp each), then one send_chunk with the new tail to the peer's `tail` word. False in every thread on failure.
template <int kWarps, typename Stage>
EPK_DEVICE bool send_stream(const StreamEnd &s, const unsigned long long *credit, const unsigned long long *tail,
                            bool &s_failed, Stage stage) {
  const int tid = threadIdx.x, warp = tid / 32;
  char *const area = reinterpret_cast<char *>(s.area);
  const uint64_t base = *s.done;
  if (tid == 0 && !stream::wait_u64_at_least(credit, base, s.deadline, stream::kPhaseStreamSpace, s.peer))
    s_failed = true;
  __syncthreads();
  for (int c0 = 0; c0 < s.count && !s_failed; c0 += s.chunk) {
    const int cnt = min(s.chunk, s.count - c0);
    if (tid == 0 && !stream::wait_space(credit, s.rings.ring, base + c0, cnt, s.deadline, s.peer)) s_failed = true;
    __syncthreads();
    if (s_failed) break;
    for (int i = c0 + warp; i < c0 + cnt; i += kWarps) stage(i, base + i, area + s.rings.stage_at(s.n, base + i));
    __threadfence_system();  // the staged messages before the WRITE that reads them
    __syncthreads();
    if (tid == 0 && !stream::send_chunk(s.q.qp(), reinterpret_cast<uint64_t>(area + s.rings.stage_at(s.n, 0)),
                                        s.q.raddr + s.rings.recv_at(s.my_node, 0), s.q.raddr + offset_in(s.area, tail),
                                        s.rings.ring, s.rings.msg, base + c0, cnt, s.deadline, s.peer))
      s_failed = true;
    __syncthreads();
  }
  if (tid == 0 && !s_failed) *s.done = base + s.count;
  return !s_failed;
}

// Receiver: per chunk, wait until it arrived (`tail`, WRITTEN by the peer), `consume(i, seq, slot)` for each message
// (a warp each), `chunk_done(messages done)` in thread 0, then the credit to the peer's `credit` word. False in every
// thread on failure.
template <int kWarps, typename Consume, typename ChunkDone>
EPK_DEVICE bool receive_stream(const StreamEnd &s, const unsigned long long *tail, const unsigned long long *credit,
                               bool &s_failed, Consume consume, ChunkDone chunk_done) {
  const int tid = threadIdx.x, warp = tid / 32;
  const char *const area = reinterpret_cast<const char *>(s.area);
  const uint64_t base = *s.done;
  for (int c0 = 0; c0 < s.count; c0 += s.chunk) {
    const int cnt = min(s.chunk, s.count - c0);
    if (tid == 0 && !stream::wait_message(tail, base + c0 + cnt - 1, s.deadline, s.peer)) s_failed = true;
    __syncthreads();
    if (s_failed) return false;
    for (int i = c0 + warp; i < c0 + cnt; i += kWarps) consume(i, base + i, area + s.rings.recv_at(s.n, base + i));
    __threadfence_system();  // what the chunk's messages gave (and their reads) before the credit frees their slots
    __syncthreads();
    if (tid == 0) {
      chunk_done(c0 + cnt);
      if (!stream::release(s.q.qp(), s.q.raddr + offset_in(s.area, credit), base + c0 + cnt, s.deadline, s.peer))
        s_failed = true;
    }
    __syncthreads();
    if (s_failed) return false;
  }
  if (tid == 0) *s.done = base + s.count;
  return true;
}
#endif  // __CUDACC__

// A combine message (a partial): header {seq u32, 0, 0, 0}, K weight partials f32, padding to 16 bytes, then the
// BF16 partial row.
EPK_DEVICE constexpr int combine_meta_bytes(int topk) { return (EPK_HT_INTER_MSG_HEADER + 4 * topk + 15) / 16 * 16; }

}  // namespace inter
}  // namespace epk
