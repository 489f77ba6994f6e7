"""Exact nearest-neighbour search in bounded memory, for memory banks of any size, on CPU or CUDA.

Distances use ‖a‖² + ‖b‖² − 2ab (one matrix product per chunk) rather than ``torch.cdist`` on the
whole bank, and both the queries and the bank are walked in chunks sized so that one distance block
stays under ``chunk_mb``.
"""
from __future__ import annotations

import torch


def _chunk_rows(chunk_mb: float, other_rows: int) -> int:
    return max(1, int(chunk_mb * 2**20 // (4 * max(other_rows, 1))))


def chunked_topk_nearest(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_mb: float = 64.0,
    query_groups: torch.Tensor | None = None, bank_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of every query: Euclidean distances [Q, k] (ascending) and indices [Q, k].

    With ``query_groups`` [Q] and ``bank_groups`` [M] (e.g. source image ids), a query never matches a
    bank row of its own group (leave-one-image-out scores); a query with no other row gets ``inf``.
    """
    num_queries, num_bank = queries.shape[0], bank.shape[0]
    k = min(k, num_bank)
    bank_rows = min(num_bank, max(k, _chunk_rows(chunk_mb / 2, min(num_queries, 4096))))
    query_rows = _chunk_rows(chunk_mb, bank_rows)
    best_sq = torch.empty(num_queries, k, device=queries.device)
    best_index = torch.empty(num_queries, k, dtype=torch.long, device=queries.device)
    for q_start in range(0, num_queries, query_rows):
        groups = None if query_groups is None else query_groups[q_start:q_start + query_rows]
        running_sq, running_index = _bank_topk_squared(queries[q_start:q_start + query_rows], bank, k, bank_rows,
                                                       groups, bank_groups)
        best_sq[q_start:q_start + query_rows] = running_sq
        best_index[q_start:q_start + query_rows] = running_index
    return best_sq.clamp_min_(0).sqrt_(), best_index


def _bank_topk_squared(query: torch.Tensor, bank: torch.Tensor, k: int, bank_rows: int,
                       query_groups: torch.Tensor | None = None, bank_groups: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances [Q, k] and indices [Q, k] of the k nearest bank rows, walking the bank in chunks."""
    query = query.float()
    query_sq = (query * query).sum(1, keepdim=True)
    running_sq = running_index = None
    for b_start in range(0, bank.shape[0], bank_rows):
        block = bank[b_start:b_start + bank_rows].float()
        squared = torch.addmm(query_sq, query, block.T, alpha=-2).add_((block * block).sum(1))
        if query_groups is not None:
            squared.masked_fill_(query_groups[:, None] == bank_groups[None, b_start:b_start + bank_rows], float("inf"))
        if k == 1:
            chunk_sq, chunk_index = squared.min(dim=1, keepdim=True)
        else:
            chunk_sq, chunk_index = torch.topk(squared, min(k, block.shape[0]), dim=1, largest=False)
        chunk_index = chunk_index + b_start
        if running_sq is None:
            running_sq, running_index = chunk_sq, chunk_index
        else:
            merged_sq = torch.cat([running_sq, chunk_sq], dim=1)
            merged_index = torch.cat([running_index, chunk_index], dim=1)
            running_sq, order = torch.topk(merged_sq, min(k, merged_sq.shape[1]), dim=1, largest=False)
            running_index = merged_index.gather(1, order)
    return running_sq, running_index


def bank_chunked_topk_nearest(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_mb: float = 64.0, sized_for: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_topk_nearest`` with chunks over the bank only, for export: the bank is a constant, so the
    loop unrolls into a fixed graph that takes any number of queries (a dynamic batch). A distance block
    holds every query; it stays under ``chunk_mb`` for ``sized_for`` queries and grows with more.
    """
    k = min(k, bank.shape[0])
    bank_rows = min(bank.shape[0], max(k, _chunk_rows(chunk_mb, sized_for)))
    squared, index = _bank_topk_squared(queries, bank, k, bank_rows)
    return squared.clamp_min(0).sqrt(), index


def chunked_nearest(queries: torch.Tensor, bank: torch.Tensor, chunk_mb: float = 64.0,
                    query_groups: torch.Tensor | None = None, bank_groups: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance [Q] to the nearest bank row (outside the query's group, if groups are given) and its index [Q]."""
    distances, indices = chunked_topk_nearest(queries, bank, 1, chunk_mb, query_groups, bank_groups)
    return distances[:, 0], indices[:, 0]
