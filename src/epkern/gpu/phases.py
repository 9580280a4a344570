"""What each error-record phase of the HT kernels means (ErrorRecord.phase, kernels/epk_constants.cuh): the text a
device-side failure is reported with. The runtime starts from these; the LL engine and the NIC transports register
their own (``Runtime.register_phases``)."""

from __future__ import annotations

from .. import kernel_constants as K

PHASES = {
    K.get("EPK_ERR_PHASE_HT_NOTIFY"): "notify (waiting for a peer's counts)",
    K.get("EPK_ERR_PHASE_HT_DISPATCH_ADDRS"): "dispatch (waiting for a peer's output addresses)",
    K.get("EPK_ERR_PHASE_HT_DISPATCH_DONE"): "dispatch (waiting for a peer to finish sending)",
    K.get("EPK_ERR_PHASE_HT_COMBINE_ADDRS"): "combine (waiting for a peer's input addresses)",
    K.get("EPK_ERR_PHASE_HT_COMBINE_DONE"): "combine (waiting for a peer to finish reading)",
    K.get("EPK_ERR_PHASE_HT_DISPATCH_OVERFLOW"): (
        "dispatch (a destination has fewer output rows than tokens sent: num_worst_tokens too small, or the "
        "destination's heap (num_nvl_bytes) could not hold what it receives)"
    ),
    K.get("EPK_ERR_PHASE_HT_SHAPE"): (
        "dispatch (a peer's call has another row size, top-k, FP8 scale columns, experts per rank, or is cached "
        "where this one is not: nothing was sent to it; value = its row bytes, limit = this rank's)"
    ),
    K.get("EPK_ERR_PHASE_HT_INTER_ORDER"): (
        "dispatch across nodes (a ring slot holds another message than the one due: value = its sequence number, "
        "limit = the one expected)"
    ),
    K.get("EPK_ERR_PHASE_HT_INTER_SPACE"): "dispatch across nodes (waiting for a forwarder's credit: ring space)",
    K.get("EPK_ERR_PHASE_HT_INTER_ARRIVAL"): "dispatch across nodes (waiting for a peer's messages)",
}
