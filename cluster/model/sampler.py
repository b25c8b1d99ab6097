"""Batched sampling with per-request parameters.

Greedy rows take the argmax and nothing else. A row with top-k (Qwen3 recommends 20), or with
top-p whose nucleus lies inside a small candidate set, is sampled among its top candidates only:
one `topk` pass over the vocabulary, then temperature, top-p and min-p on a [rows, k] tensor. The
other rows (temperature alone, min-p, a wide nucleus) take one softmax and one cumulative sum over
the vocabulary. Either way a row draws one uniform number and takes the first token whose
cumulative probability passes it (inverse-CDF sampling), so a request with a seed draws from its
own generator and its output does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
import threading

import torch

from cluster.config import SamplingParams
from cluster.model.staging import upload

_local = threading.local()

# Candidates a top-p row without top-k starts from; when their mass falls short of top_p the row
# takes the full-vocabulary path instead, so the result is exact either way.
TOP_P_CANDIDATES = 256


TopLogprobs = list[tuple[int, float]]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    raw: torch.Tensor | None = None, sync_free: bool = False,
) -> tuple[list[int], list[float | None], list[TopLogprobs | None]]:
    """logits [B, V] (processed, see logits.py) -> (token ids, the logprob of each chosen token
    under the model's own distribution `raw` (default: `logits`), and the `top_logprobs` most
    likely tokens with theirs), logprobs only for rows that asked. The logprobs are the model's
    before any processing, as vLLM returns by default. Everything comes back in one read.

    Which rows take which path is decided from the parameters, on the host. The one decision
    that depends on the logits (whether a top-p nucleus reaches past the candidates) is read to
    the host on the CPU, where that costs nothing; with `sync_free` (a GPU's decode step) both
    paths are computed for those rows and chosen between on the device."""
    logits = logits.float()
    raw = logits if raw is None else raw
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == len(params):
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    else:
        tokens = logits.argmax(dim=-1)
    if rows:
        u = _uniforms([generators[i] for i in rows], logits.device)
        tokens[_index(rows, logits)] = _sample_rows(_take(logits, rows), [params[i] for i in rows], u, sync_free)
    want = [i for i, p in enumerate(params) if p.logprobs]
    lps: list[float | None] = [None] * len(params)
    tops: list[TopLogprobs | None] = [None] * len(params)
    if not want:
        return read_to_host(tokens).long().tolist(), lps, tops
    w = _index(want, logits)
    logp = torch.log_softmax(raw[w].float(), dim=-1)
    chosen = logp.gather(1, tokens[w].unsqueeze(1)).squeeze(1)
    k = max(params[i].top_logprobs for i in want)
    values, ids = logp.topk(k, dim=-1) if k else (chosen[:0], chosen[:0])
    packed = torch.cat([tokens.double(), chosen.double(), values.double().flatten(), ids.double().flatten()])
    flat = read_to_host(packed).tolist()  # ids below 2^53 are exact in float64
    b, nw = len(params), len(want)
    for j, i in enumerate(want):
        lps[i] = flat[b + j]
        n = params[i].top_logprobs
        if n:
            vs = flat[b + nw + j * k : b + nw + j * k + n]
            ts = flat[b + nw + nw * k + j * k : b + nw + nw * k + j * k + n]
            tops[i] = [(int(t), v) for t, v in zip(ts, vs)]
    return [int(t) for t in flat[:b]], lps, tops


def read_to_host(x: torch.Tensor) -> torch.Tensor:
    """The step's one device-to-host read: into pinned memory (PyTorch's caching host allocator
    keeps it), then one wait on the stream."""
    if not x.is_cuda:
        return x
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return out


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) per row: a seeded row's from its own generator, the others in one draw."""
    u = torch.rand(len(generators), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device)[0]
    return u


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return upload(rows, like.device, torch.long)


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x's rows, without copying [B, V] when they are all of them (the usual batch)."""
    return x if len(rows) == x.shape[0] else x.index_select(0, _index(rows, x))


def column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row values as a [rows, 1] tensor beside `like` (from pinned memory on a GPU)."""
    return upload(values, like.device, like.dtype).unsqueeze(1)


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """Sampled ids for rows that are not greedy; u holds each row's uniform draw."""
    vocab = logits.shape[1]
    small = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or (p.top_k == 0 and p.top_p < 1)]
    chosen = set(small)
    full = [i for i in range(len(params)) if i not in chosen]
    picked = torch.empty(len(params), dtype=torch.long, device=logits.device)
    if small:
        idx = _index(small, logits)
        got, missed = _sample_candidates(_take(logits, small), [params[i] for i in small], u[idx], sync_free)
        if isinstance(missed, torch.Tensor):  # sync-free: the full path for every row that may miss
            sub = [j for j, i in enumerate(small) if params[i].top_k == 0]  # positions in `small`
            maybe = [small[j] for j in sub]
            at = _index(sub, got)
            other = _sample_full(_take(logits, maybe), [params[i] for i in maybe], u[_index(maybe, u)])
            got[at] = torch.where(missed[at], other, got[at])
            missed = []
        picked[idx] = got
        full = sorted(full + [small[i] for i in missed])
    if full:
        idx = _index(full, logits)
        picked[idx] = _sample_full(_take(logits, full), [params[i] for i in full], u[idx])
    return picked


def _sample_candidates(
    logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor, sync_free: bool = False,
) -> tuple[torch.Tensor, list[int] | torch.Tensor]:
    """Rows sampled among their top-k (or TOP_P_CANDIDATES) tokens; returns the ids and the rows
    whose top-p nucleus reaches past the candidates (to be sampled over the full vocabulary): a
    list read to the host, or with `sync_free` a [rows] boolean tensor left on the device."""
    ks = [p.top_k if p.top_k > 0 else min(TOP_P_CANDIDATES, logits.shape[1]) for p in params]
    width = max(ks)
    temps = column([p.temperature for p in params], logits)
    values, ids = logits.topk(width, dim=-1)  # sorted, descending
    scaled = values / temps
    beyond_k = torch.arange(width, device=logits.device) >= upload(ks, logits.device).unsqueeze(1)
    scaled = scaled.masked_fill(beyond_k, float("-inf"))
    # Probabilities renormalised within the top-k (top-k filters first, then top-p, as in vLLM).
    denom = torch.logsumexp(scaled, dim=-1)
    no_k = [i for i, p in enumerate(params) if p.top_k == 0]
    if no_k:  # the full softmax's denominator, so that the candidates' mass tells whether the nucleus fits
        rows = _index(no_k, logits)
        denom[rows] = torch.logsumexp(_take(logits, no_k) / temps[rows], dim=-1)
    probs = (scaled - denom.unsqueeze(1)).exp()
    top_p = column([p.top_p for p in params], logits)
    before = probs.cumsum(dim=-1) - probs
    missed: list[int] | torch.Tensor = []
    if no_k and sync_free:
        missed = (probs.sum(dim=-1, keepdim=True) <= top_p).squeeze(1)
    elif no_k:  # the one host read here, and only for rows whose nucleus may reach past the candidates
        mass = probs[_index(no_k, probs)].sum(dim=-1).tolist()
        missed = [i for i, m in zip(no_k, mass) if m <= params[i].top_p]
    probs = probs.masked_fill(before > top_p, 0.0)  # the first token is always kept
    probs = _min_p(probs, params)
    pos = _inverse_cdf(probs, u)
    return ids.gather(1, pos.unsqueeze(1)).squeeze(1), missed


def _sample_full(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Rows sampled over the whole vocabulary in three passes: exp((x - max) / T), which is the
    softmax without its normalisation (inverse-CDF sampling needs none, and min-p compares with
    the largest, which is 1), then the cumulative sum, then the search. Top-p here (a nucleus
    wider than the candidates) sorts, which only such rows pay."""
    temps = column([p.temperature for p in params], logits)
    weights = torch.sub(logits, logits.amax(dim=-1, keepdim=True), out=scratch(logits.shape, logits.dtype, logits.device)).div_(temps).exp_()
    top_p = [p.top_p for p in params]
    if any(t < 1 for t in top_p):
        sorted_w, order = weights.sort(dim=-1, descending=True)
        cum = sorted_w.cumsum(dim=-1)
        drop = cum - sorted_w > column(top_p, weights) * cum[:, -1:]
        weights = weights.masked_fill_(drop.scatter(1, order, drop), 0.0)
    return _inverse_cdf(_min_p(weights, params), u)


def scratch(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device,
            slot: str = "work") -> torch.Tensor:
    """A work buffer of `shape`, reused from step to step by this thread. On the CPU a fresh
    [rows, vocab] tensor (39 MB at 64 rows of Qwen3's vocabulary) is a new mapping from the
    allocator every step, and faulting its pages in cost more than the exp and the cumulative sum
    (measured: 27 -> 12 ms per step at 64 rows). One per thread and `slot`, as each engine steps
    on its own: "work" is the sampler's (the structured-output mask in logits.py borrows it too,
    and is done with it before sampling), "logits" holds the step's float32 logits (logits.py).
    What it returns is valid until the next call for the same slot on this thread.
    Remade when inference mode changes (an inference tensor cannot be written outside it)."""
    n = math.prod(shape)
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if (buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device
            or buf.is_inference() != torch.is_inference_mode_enabled()):
        buf = bufs[slot] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def _min_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Drops tokens below min_p times the row's most likely one (weights need no normalisation)."""
    min_p = [p.min_p for p in params]
    if not any(m > 0 for m in min_p):
        return probs
    floor = probs.amax(dim=-1, keepdim=True) * column(min_p, probs)
    return probs.masked_fill_(probs < floor, 0.0)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative (unnormalised) probability exceeds u * total.
    Zero-probability positions can never be chosen: the cumulative sum does not grow there.
    Overwrites `probs` with its cumulative sum."""
    cdf = torch.cumsum(probs, dim=-1, out=probs) if probs.is_contiguous() else probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    pos = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # u * total rounded up to the total lands past the end: then the first position that reaches
    # the total, which is the last token with mass (chosen on the device: no read of `past`).
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous()).squeeze(1)
    return torch.where(pos >= probs.shape[1], last, pos)
