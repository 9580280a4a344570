"""The ABI-mode cdef: exactly the rdma-core (v44) structs, enums and exported symbols epkern uses.

Layouts are for Linux x86_64 / aarch64 (LP64). ``tests/test_verbs_cffi.py`` compiles a small API-mode module
against the real ``<infiniband/verbs.h>`` and ``<infiniband/mlx5dv.h>`` and checks every struct size, field
offset, field size and enum value below against the compiler's, and every function signature against the
header's prototype.

Notes on symbols (verified with ``nm -D`` on libibverbs.so.1 / libmlx5.so.1 of rdma-core 44):
- ``ibv_query_port`` is a macro around the static inline ``___ibv_query_port``; its fallback path calls the
  exported ``ibv_query_port`` (declared with ``struct _compat_ibv_port_attr *``, a prefix of
  ``struct ibv_port_attr``) after zeroing the full struct. We bind the exported symbol and pass a full,
  zeroed ``struct ibv_port_attr``, exactly as that fallback does.
- ``ibv_reg_mr`` is a macro choosing between the exported ``ibv_reg_mr`` and ``ibv_reg_mr_iova2``; we bind
  ``ibv_reg_mr_iova2`` (what the exported ``ibv_reg_mr`` calls, with iova = addr).
- ``ibv_get_device_list`` is a macro only when static providers are built in; the exported symbol is used.
- ``pthread_mutex_t`` / ``pthread_cond_t`` inside ``struct ibv_qp`` are declared as opaque ``uint64_t``
  arrays of the same size and alignment (40 and 48 bytes on LP64 glibc); ``off_t`` is ``int64_t``.
"""

from __future__ import annotations

from ._cdef_posting import POSTING_CDEF

_CORE_CDEF = r"""
struct ibv_device;
struct ibv_context;
struct ibv_cq;
struct ibv_srq;
struct ibv_comp_channel;
struct ibv_wq;
struct ibv_dm;
struct ibv_ah;
struct mlx5dv_srq;
struct mlx5dv_rwq;
struct mlx5dv_dm;
struct mlx5dv_ah;
struct mlx5dv_pd;

enum ibv_mtu {
    IBV_MTU_256 = 1,
    IBV_MTU_512 = 2,
    IBV_MTU_1024 = 3,
    IBV_MTU_2048 = 4,
    IBV_MTU_4096 = 5
};

enum ibv_port_state {
    IBV_PORT_NOP = 0,
    IBV_PORT_DOWN = 1,
    IBV_PORT_INIT = 2,
    IBV_PORT_ARMED = 3,
    IBV_PORT_ACTIVE = 4,
    IBV_PORT_ACTIVE_DEFER = 5
};

enum {
    IBV_LINK_LAYER_UNSPECIFIED = 0,
    IBV_LINK_LAYER_INFINIBAND = 1,
    IBV_LINK_LAYER_ETHERNET = 2
};

enum ibv_access_flags {
    IBV_ACCESS_LOCAL_WRITE = 1,
    IBV_ACCESS_REMOTE_WRITE = 2,
    IBV_ACCESS_REMOTE_READ = 4,
    IBV_ACCESS_REMOTE_ATOMIC = 8,
    IBV_ACCESS_MW_BIND = 16,
    IBV_ACCESS_ZERO_BASED = 32,
    IBV_ACCESS_ON_DEMAND = 64,
    IBV_ACCESS_HUGETLB = 128,
    IBV_ACCESS_RELAXED_ORDERING = 1048576
};

enum ibv_qp_type {
    IBV_QPT_RC = 2,
    IBV_QPT_UC = 3,
    IBV_QPT_UD = 4
};

enum ibv_qp_state {
    IBV_QPS_RESET = 0,
    IBV_QPS_INIT = 1,
    IBV_QPS_RTR = 2,
    IBV_QPS_RTS = 3,
    IBV_QPS_SQD = 4,
    IBV_QPS_SQE = 5,
    IBV_QPS_ERR = 6,
    IBV_QPS_UNKNOWN = 7
};

enum ibv_mig_state {
    IBV_MIG_MIGRATED = 0,
    IBV_MIG_REARM = 1,
    IBV_MIG_ARMED = 2
};

enum ibv_qp_attr_mask {
    IBV_QP_STATE = 1,
    IBV_QP_CUR_STATE = 2,
    IBV_QP_EN_SQD_ASYNC_NOTIFY = 4,
    IBV_QP_ACCESS_FLAGS = 8,
    IBV_QP_PKEY_INDEX = 16,
    IBV_QP_PORT = 32,
    IBV_QP_QKEY = 64,
    IBV_QP_AV = 128,
    IBV_QP_PATH_MTU = 256,
    IBV_QP_TIMEOUT = 512,
    IBV_QP_RETRY_CNT = 1024,
    IBV_QP_RNR_RETRY = 2048,
    IBV_QP_RQ_PSN = 4096,
    IBV_QP_MAX_QP_RD_ATOMIC = 8192,
    IBV_QP_ALT_PATH = 16384,
    IBV_QP_MIN_RNR_TIMER = 32768,
    IBV_QP_SQ_PSN = 65536,
    IBV_QP_MAX_DEST_RD_ATOMIC = 131072,
    IBV_QP_PATH_MIG_STATE = 262144,
    IBV_QP_CAP = 524288,
    IBV_QP_DEST_QPN = 1048576,
    IBV_QP_RATE_LIMIT = 33554432
};

enum mlx5dv_obj_type {
    MLX5DV_OBJ_QP = 1,
    MLX5DV_OBJ_CQ = 2,
    MLX5DV_OBJ_SRQ = 4,
    MLX5DV_OBJ_RWQ = 8,
    MLX5DV_OBJ_DM = 16,
    MLX5DV_OBJ_AH = 32,
    MLX5DV_OBJ_PD = 64
};

union ibv_gid {
    uint8_t raw[16];
    struct {
        uint64_t subnet_prefix;
        uint64_t interface_id;
    } global;
};

struct ibv_port_attr {
    enum ibv_port_state state;
    enum ibv_mtu max_mtu;
    enum ibv_mtu active_mtu;
    int gid_tbl_len;
    uint32_t port_cap_flags;
    uint32_t max_msg_sz;
    uint32_t bad_pkey_cntr;
    uint32_t qkey_viol_cntr;
    uint16_t pkey_tbl_len;
    uint16_t lid;
    uint16_t sm_lid;
    uint8_t lmc;
    uint8_t max_vl_num;
    uint8_t sm_sl;
    uint8_t subnet_timeout;
    uint8_t init_type_reply;
    uint8_t active_width;
    uint8_t active_speed;
    uint8_t phys_state;
    uint8_t link_layer;
    uint8_t flags;
    uint16_t port_cap_flags2;
};

struct ibv_pd {
    struct ibv_context *context;
    uint32_t handle;
};

struct ibv_mr {
    struct ibv_context *context;
    struct ibv_pd *pd;
    void *addr;
    size_t length;
    uint32_t handle;
    uint32_t lkey;
    uint32_t rkey;
};

struct ibv_qp {
    struct ibv_context *context;
    void *qp_context;
    struct ibv_pd *pd;
    struct ibv_cq *send_cq;
    struct ibv_cq *recv_cq;
    struct ibv_srq *srq;
    uint32_t handle;
    uint32_t qp_num;
    enum ibv_qp_state state;
    enum ibv_qp_type qp_type;
    uint64_t mutex[5];
    uint64_t cond[6];
    uint32_t events_completed;
};

struct ibv_qp_cap {
    uint32_t max_send_wr;
    uint32_t max_recv_wr;
    uint32_t max_send_sge;
    uint32_t max_recv_sge;
    uint32_t max_inline_data;
};

struct ibv_qp_init_attr {
    void *qp_context;
    struct ibv_cq *send_cq;
    struct ibv_cq *recv_cq;
    struct ibv_srq *srq;
    struct ibv_qp_cap cap;
    enum ibv_qp_type qp_type;
    int sq_sig_all;
};

struct ibv_global_route {
    union ibv_gid dgid;
    uint32_t flow_label;
    uint8_t sgid_index;
    uint8_t hop_limit;
    uint8_t traffic_class;
};

struct ibv_ah_attr {
    struct ibv_global_route grh;
    uint16_t dlid;
    uint8_t sl;
    uint8_t src_path_bits;
    uint8_t static_rate;
    uint8_t is_global;
    uint8_t port_num;
};

struct ibv_qp_attr {
    enum ibv_qp_state qp_state;
    enum ibv_qp_state cur_qp_state;
    enum ibv_mtu path_mtu;
    enum ibv_mig_state path_mig_state;
    uint32_t qkey;
    uint32_t rq_psn;
    uint32_t sq_psn;
    uint32_t dest_qp_num;
    unsigned int qp_access_flags;
    struct ibv_qp_cap cap;
    struct ibv_ah_attr ah_attr;
    struct ibv_ah_attr alt_ah_attr;
    uint16_t pkey_index;
    uint16_t alt_pkey_index;
    uint8_t en_sqd_async_notify;
    uint8_t sq_draining;
    uint8_t max_rd_atomic;
    uint8_t max_dest_rd_atomic;
    uint8_t min_rnr_timer;
    uint8_t port_num;
    uint8_t timeout;
    uint8_t retry_cnt;
    uint8_t rnr_retry;
    uint8_t alt_port_num;
    uint8_t alt_timeout;
    uint32_t rate_limit;
};

struct mlx5dv_qp {
    uint32_t *dbrec;
    struct {
        void *buf;
        uint32_t wqe_cnt;
        uint32_t stride;
    } sq;
    struct {
        void *buf;
        uint32_t wqe_cnt;
        uint32_t stride;
    } rq;
    struct {
        void *reg;
        uint32_t size;
    } bf;
    uint64_t comp_mask;
    int64_t uar_mmap_offset;
    uint32_t tirn;
    uint32_t tisn;
    uint32_t rqn;
    uint32_t sqn;
    uint64_t tir_icm_addr;
};

struct mlx5dv_cq {
    void *buf;
    uint32_t *dbrec;
    uint32_t cqe_cnt;
    uint32_t cqe_size;
    void *cq_uar;
    uint32_t cqn;
    uint64_t comp_mask;
};

struct mlx5dv_obj {
    struct {
        struct ibv_qp *in;
        struct mlx5dv_qp *out;
    } qp;
    struct {
        struct ibv_cq *in;
        struct mlx5dv_cq *out;
    } cq;
    struct {
        struct ibv_srq *in;
        struct mlx5dv_srq *out;
    } srq;
    struct {
        struct ibv_wq *in;
        struct mlx5dv_rwq *out;
    } rwq;
    struct {
        struct ibv_dm *in;
        struct mlx5dv_dm *out;
    } dm;
    struct {
        struct ibv_ah *in;
        struct mlx5dv_ah *out;
    } ah;
    struct {
        struct ibv_pd *in;
        struct mlx5dv_pd *out;
    } pd;
};
"""

CDEF = _CORE_CDEF + POSTING_CDEF

# Prototypes (each ends with ';'); parsed by the layout test to check each against the real header.
VERBS_FUNCTIONS = r"""
struct ibv_device **ibv_get_device_list(int *num_devices);
void ibv_free_device_list(struct ibv_device **list);
const char *ibv_get_device_name(struct ibv_device *device);
struct ibv_context *ibv_open_device(struct ibv_device *device);
int ibv_close_device(struct ibv_context *context);
int ibv_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *port_attr);
int ibv_query_gid(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid);
struct ibv_pd *ibv_alloc_pd(struct ibv_context *context);
int ibv_dealloc_pd(struct ibv_pd *pd);
struct ibv_mr *ibv_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t length, uint64_t iova, unsigned int access);
struct ibv_mr *ibv_reg_dmabuf_mr(struct ibv_pd *pd, uint64_t offset, size_t length, uint64_t iova, int fd, int access);
int ibv_dereg_mr(struct ibv_mr *mr);
struct ibv_cq *ibv_create_cq(struct ibv_context *context, int cqe, void *cq_context,
                              struct ibv_comp_channel *channel, int comp_vector);
int ibv_destroy_cq(struct ibv_cq *cq);
struct ibv_qp *ibv_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *qp_init_attr);
int ibv_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask);
int ibv_destroy_qp(struct ibv_qp *qp);
const char *ibv_wc_status_str(enum ibv_wc_status status);
"""

MLX5_FUNCTIONS = r"""
bool mlx5dv_is_supported(struct ibv_device *device);
int mlx5dv_init_obj(struct mlx5dv_obj *obj, uint64_t obj_type);
"""

# Exported symbols whose header prototype differs on purpose (see the module docstring); the layout test
# skips only these in its prototype check.
PROTOTYPE_EXCEPTIONS = {"ibv_query_port"}


def _constants() -> dict[str, int]:
    import re

    return {name: int(value) for name, value in re.findall(r"^\s+((?:IBV|MLX5DV)_\w+)\s*=\s*(\d+)", CDEF, re.M)}


# Every enum constant of the cdef (all written as decimal literals there), e.g. CONSTANTS["IBV_QP_STATE"].
CONSTANTS: dict[str, int] = _constants()
