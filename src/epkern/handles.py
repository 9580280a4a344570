"""What the LL handles of both backends share: DeepEP's handle is a tuple."""

from __future__ import annotations


class DeepEPTuple:
    """Iterating, indexing and ``len`` give DeepEP's LL handle tuple ``(src_info, layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)``; the class's fields hold the rest."""

    def _fields(self):
        return (self.src_info, self.layout_range, self.num_max_dispatch_tokens_per_rank, self.hidden, self.num_experts)

    def __iter__(self):
        return iter(self._fields())

    def __getitem__(self, i):
        return self._fields()[i]

    def __len__(self) -> int:
        return 5
