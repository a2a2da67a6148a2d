"""The shared-prefix forward: a batch's common prompt prefix runs through the trunk once.

Rows of a recipe share their system prompt and the chat template around it; running that prefix once per
batch instead of once per row saves the trunk's work on it. The result equals the full forward on every real
token (tests/test_train.py checks hidden states and gradients).
"""

from __future__ import annotations

from ..models import cache_argument

#: Longest sequence of a batch's tails packed behind their shared prefix: a packed sequence attends through a
#: full mask, whose cost grows with the square of its length, so longer groups run row by row instead.
PACK_MAX_TOKENS = 1024


def shared_prefix_hidden(trunk, input_ids, attention_mask, min_prefix: int = 8, packed: bool | None = None):
    """``trunk(input_ids, attention_mask).last_hidden_state`` with the prompt prefix that rows share computed once.

    Rows of a right-padded batch are grouped by their common leading tokens (a recipe's system prompt
    and the chat template around it are identical in every row); each group runs that prefix once and
    then its rows' remaining tokens on top of the prefix's key/value cache: packed into one sequence
    without padding where the attention implementation takes a custom mask (each tail sees the prefix
    and itself only), else as padded rows over a repeated cache; with ``packed="one_pass"`` the prefix
    and the packed tails run as one sequence, in one call. Causal attention makes the result the
    same as the full forward on every real token (tests/test_train.py checks hidden states and
    gradients; padding positions hold no meaningful values). ``packed`` None packs where the implementation
    takes the mask, in one pass under bf16 autocast on a CPU, where a second pass of small operations
    costs more than the matmuls it saves (1.21x in an A/B, docs/performance.md).
    """
    import torch

    cache_name = cache_argument(trunk)
    if packed is None:
        packed = trunk.config._attn_implementation in ("sdpa", "eager") and (
            "one_pass" if input_ids.device.type == "cpu" and torch.is_autocast_enabled("cpu") else True)
    lengths = attention_mask.sum(1).tolist()
    width = input_ids.size(1)
    parts, order = [], []
    for rows, shared in prefix_groups(input_ids, attention_mask, min_prefix):
        index = torch.tensor(rows, device=input_ids.device)
        if shared and packed and sum(lengths[r] for r in rows) - (len(rows) - 1) * shared > PACK_MAX_TOKENS:
            shared = 0  # a long packed sequence's mask costs more than the prefix it saves
        if not shared:
            parts.append(trunk(input_ids=input_ids[index], attention_mask=attention_mask[index],
                               use_cache=False).last_hidden_state)
        elif packed:
            one_pass = packed == "one_pass"
            tails = [int(lengths[r]) - shared for r in rows]
            pieces = [input_ids[r, shared:shared + t] for r, t in zip(rows, tails)]
            spans = [torch.arange(shared, shared + t, device=input_ids.device) for t in tails]
            if one_pass:
                pieces.insert(0, input_ids[rows[0], :shared])
                spans.insert(0, torch.arange(shared, device=input_ids.device))
                run, dtype = {"use_cache": False}, trunk.get_input_embeddings().weight.dtype
            else:
                prefix = trunk(input_ids=input_ids[index[:1], :shared], use_cache=True)
                run, dtype = {cache_name: prefix[cache_name], "use_cache": True}, prefix.last_hidden_state.dtype
            mask = _packed_tail_mask(shared, tails, dtype, input_ids.device, trunk.config._attn_implementation,
                                     prefix_rows=one_pass)
            hidden = trunk(input_ids=torch.cat(pieces)[None], attention_mask=mask, position_ids=torch.cat(spans)[None],
                           **run).last_hidden_state[0]
            head = hidden[None, :shared] if one_pass else prefix.last_hidden_state
            tail = torch.nn.utils.rnn.pad_sequence(list(hidden[shared if one_pass else 0:].split(tails)),
                                                   batch_first=True)
            tail = torch.nn.functional.pad(tail, (0, 0, 0, width - shared - tail.size(1)))
            parts.append(torch.cat([head.expand(len(rows), -1, -1), tail], dim=1))
        else:
            prefix = trunk(input_ids=input_ids[index[:1], :shared], use_cache=True)
            cache = prefix[cache_name]
            cache.batch_repeat_interleave(len(rows))
            tail = trunk(input_ids=input_ids[index, shared:], attention_mask=attention_mask[index],
                         position_ids=torch.arange(shared, width, device=input_ids.device).expand(len(rows), -1),
                         **{cache_name: cache}, use_cache=True).last_hidden_state
            parts.append(torch.cat([prefix.last_hidden_state.expand(len(rows), -1, -1), tail], dim=1))
        order += rows
    hidden = torch.cat(parts)
    return hidden[torch.argsort(torch.tensor(order, device=hidden.device))]


def prefix_groups(input_ids, attention_mask, min_prefix: int = 8) -> list[tuple[list[int], int]]:
    """The rows of a right-padded batch grouped by their common leading tokens: ``(rows, shared)`` pairs,
    ``shared`` being the length of the prefix the group runs once (0 for a row that shares none with
    another: it runs whole). Every row keeps at least one token of its own."""
    lengths = attention_mask.sum(1).tolist()
    ids = input_ids.tolist()
    groups: list[list] = []  # [rows, length of the prefix they share]
    for row, n in enumerate(lengths):
        for group in groups:
            leader = group[0][0]
            limit = min(group[1], n - 1)
            common = next((i for i in range(limit) if ids[row][i] != ids[leader][i]), limit)
            if common >= min_prefix:
                group[0].append(row)
                group[1] = common
                break
        else:
            groups.append([[row], n - 1])
    return [(rows, shared if len(rows) > 1 and shared >= min_prefix else 0) for rows, shared in groups]


def _packed_tail_mask(prefix: int, tails: list[int], dtype, device, implementation: str, prefix_rows: bool = False):
    """The 4D attention mask of tails packed into one sequence after a cached prefix: each tail token
    sees the whole prefix and the tokens of its own tail up to itself. With ``prefix_rows`` the prefix's
    own tokens come first in the sequence (causal among themselves). Boolean for SDPA, additive for eager."""
    import torch

    segment = torch.repeat_interleave(torch.arange(len(tails), device=device), torch.tensor(tails, device=device))
    causal = torch.ones(len(segment), len(segment), dtype=torch.bool, device=device).tril()
    allowed = torch.cat([torch.ones(len(segment), prefix, dtype=torch.bool, device=device),
                         causal & (segment[:, None] == segment[None, :])], dim=1)
    if prefix_rows:
        own = torch.ones(prefix, prefix, dtype=torch.bool, device=device).tril()
        allowed = torch.cat([torch.cat([own, torch.zeros(prefix, len(segment), dtype=torch.bool, device=device)], 1),
                             allowed])
    allowed = allowed[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
