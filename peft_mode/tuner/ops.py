"""The MoDE update as tensor operations.

Notation (as in the `MoDEConfig` docstring): P input features, Q output features, rank r,
m experts, expert rank p, S = r / p routing slots, N tokens.

The update for one token x (1 x P) is ``sum_k sum_i R_{k,i}(x) * x A_k B_{i,k}^T`` with
``R_k(x) = softmax_i(x W_R,k)``. It is computed with two matrix products, the same as a
LoRA of equal parameter count:

1. project down and route in one product: ``[h | logits] = x [A; W_R]^T``;
2. softmax the logits per slot and mix: ``mixed[n, k, i, :] = R[n, k, i] * h[n, k, :]``,
   an (N, S, m, p) tensor;
3. project up in one product: ``mixed`` flattened to (N, S*m*p) times the up-projections
   of all experts arranged slot-major, ``up[q, (k, i, j)] = B[i, q, k*p + j]``.

No per-expert output (N x Q for each expert) is ever formed. Training uses a custom
autograd function that saves h and, with a shared down-projection, the routing weights
(besides the input and the parameters), and recomputes everything else in the backward pass.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def arrange_down_weight(
    down_weight: torch.Tensor, num_experts: int, expert_rank: int, shared: bool
) -> torch.Tensor:
    """Reorder the rows of a down-projection into slot-major order.

    Args:
        down_weight: ``(r, P)`` when shared (returned unchanged), or ``(m * r, P)`` with
            rows ``i*r:(i+1)*r`` for expert i when each expert has its own.
        num_experts: m.
        expert_rank: p.
        shared: whether one down-projection serves all experts.

    Returns:
        ``(r, P)`` or ``(S * m * p, P)`` with row ``(k * m + i) * p + j`` holding expert i's
        row ``k * p + j``.
    """
    if shared:
        return down_weight
    rows, in_features = down_weight.shape
    rank = rows // num_experts
    slots = rank // expert_rank
    by_expert = down_weight.view(num_experts, slots, expert_rank, in_features)
    return by_expert.transpose(0, 1).reshape(rows, in_features)


def arrange_up_weight(up_weight: torch.Tensor, expert_rank: int) -> torch.Tensor:
    """Arrange the experts' up-projections as one ``(Q, S * m * p)`` matrix in slot-major order.

    Args:
        up_weight: ``(m, Q, r)``; ``up_weight[i]`` has the layout of a LoRA ``lora_B`` weight.
        expert_rank: p.

    Returns:
        ``(Q, S * m * p)`` with column ``(k * m + i) * p + j`` equal to ``up_weight[i, :, k * p + j]``.
    """
    num_experts, out_features, rank = up_weight.shape
    slots = rank // expert_rank
    by_slot = up_weight.view(num_experts, out_features, slots, expert_rank)
    return by_slot.permute(1, 2, 0, 3).reshape(out_features, slots * num_experts * expert_rank)


def softmax_over_experts_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place; returns ``logits`` holding the probabilities.

    With few experts (a last dimension of 2 to 32) this elementwise form is about five
    times faster on CPU than `torch.softmax` (torch 2.13), whose kernel is tuned for long rows.
    """
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def keep_top_k_(routing_weights: torch.Tensor, top_k: int) -> torch.Tensor:
    """Zero all but the ``top_k`` largest weights of each row and renormalise them, in place.

    The result equals a softmax over the selected experts' logits only, so the softmax
    backward formula applied to it gives the gradient of top-k routing: zero for the
    experts left out.
    """
    kept = torch.zeros_like(routing_weights)
    values, indices = routing_weights.topk(top_k, dim=-1)
    kept.scatter_(-1, indices, values / values.sum(dim=-1, keepdim=True))
    return routing_weights.copy_(kept)


def mask_to_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Return ``logits`` with every entry outside the ``top_k`` largest of its row set to -inf."""
    threshold = logits.topk(top_k, dim=-1).values[..., -1:].detach()
    return logits.masked_fill(logits < threshold, float("-inf"))


def softmax_over_experts(logits: torch.Tensor) -> torch.Tensor:
    """Differentiable softmax over the last dimension, computed in float32 at least; see `softmax_over_experts_`."""
    working = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    exponentials = (working - working.amax(dim=-1, keepdim=True).detach()).exp()
    return (exponentials / exponentials.sum(dim=-1, keepdim=True)).to(logits.dtype)


def _route_(logits: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Turn ``(N, S, m)`` router logits into routing weights in place, keeping the ``top_k`` largest if set."""
    routing_weights = softmax_over_experts_(logits)
    if top_k is not None and top_k < logits.shape[-1]:
        keep_top_k_(routing_weights, top_k)
    return routing_weights


def _mix(
    routing_weights: torch.Tensor, down_projection: torch.Tensor, shared: bool, expert_rank: int
) -> torch.Tensor:
    """Weight each slot's down-projection by each expert's routing weight.

    Args:
        routing_weights: ``(N, S, m)``.
        down_projection: ``(N, S * p)`` when shared, ``(N, S * m * p)`` slot-major otherwise.

    Returns:
        ``(N, S * m * p)``, slot-major.
    """
    tokens, slots, num_experts = routing_weights.shape
    if shared:
        per_slot = down_projection.view(tokens, slots, 1, expert_rank)
    else:
        per_slot = down_projection.view(tokens, slots, num_experts, expert_rank)
    mixed = routing_weights.unsqueeze(-1) * per_slot
    return mixed.view(tokens, slots * num_experts * expert_rank)


class _FusedMoDEUpdate(torch.autograd.Function):
    """MoDE update with a hand-written backward.

    With a shared down-projection, saves one (N, r + S*m) tensor per call: the
    down-projection h and, written over the router logits, the routing weights. With one
    down-projection per expert, saves only h (N, m*r) and recomputes the routing weights
    from the input in the backward pass: one extra (N, P) x (P, S*m) product buys back
    S*m saved columns, which for p = 1 would double the saved width. The mixed activations
    are always recomputed and the rearranged weights rebuilt from the parameters, so the
    activation memory stays near that of a LoRA of equal size (at most 1.18x over the
    benchmark grid in docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x, down_weight, router_weight, up_weight, expert_rank, scaling, shared, top_k):
        num_experts = up_weight.shape[0]
        slots = router_weight.shape[0] // num_experts
        down_rows = down_weight.shape[0]
        tokens = x.shape[0]

        if shared:
            # Project down and compute the router logits with one matrix product.
            fused_weight = torch.cat([down_weight, router_weight])
            projected = x @ fused_weight.t()
            down_projection = projected[:, :down_rows]
            logits = projected[:, down_rows:]
        else:
            # Two products, so that only the down-projection is saved and the backward pass
            # recomputes the logits from the saved input.
            down_projection = x @ arrange_down_weight(down_weight, num_experts, expert_rank, shared).t()
            logits = x @ router_weight.t()

        # Route: one softmax over the experts per slot, computed in place over the logits.
        routing_weights = _route_(logits.view(tokens, slots, num_experts), top_k)

        # Mix and project up.
        mixed = _mix(routing_weights, down_projection, shared, expert_rank)
        if scaling != 1.0:
            mixed = mixed * scaling
        update = mixed @ arrange_up_weight(up_weight, expert_rank).t()

        ctx.save_for_backward(x, down_weight, router_weight, up_weight, projected if shared else down_projection)
        ctx.expert_rank = expert_rank
        ctx.scaling = scaling
        ctx.shared = shared
        ctx.top_k = top_k
        ctx.mark_non_differentiable(routing_weights)
        return update, routing_weights

    @staticmethod
    def backward(ctx, grad_update, _grad_routing):
        x, down_weight, router_weight, up_weight, saved = ctx.saved_tensors
        expert_rank, scaling, shared = ctx.expert_rank, ctx.scaling, ctx.shared
        num_experts, out_features, rank = up_weight.shape
        down_rows = down_weight.shape[0]
        tokens = x.shape[0]
        slots = router_weight.shape[0] // num_experts
        grad_update = grad_update.reshape(tokens, out_features)
        if shared:
            down_projection = saved[:, :down_rows]
            routing_weights = saved[:, down_rows:].view(tokens, slots, num_experts)
        else:
            # Recompute the routing weights with the same operations as the forward pass.
            down_projection = saved
            routing_weights = _route_((x @ router_weight.t()).view(tokens, slots, num_experts), ctx.top_k)
        up_matrix = arrange_up_weight(up_weight, expert_rank)

        # Up-projection: recompute the mixed activations instead of storing them.
        mixed = _mix(routing_weights, down_projection, shared, expert_rank)
        grad_up_matrix = grad_update.t() @ mixed
        grad_mixed = grad_update @ up_matrix
        if scaling != 1.0:
            grad_up_matrix = grad_up_matrix * scaling
            grad_mixed = grad_mixed * scaling
        grad_mixed = grad_mixed.view(tokens, slots, num_experts, expert_rank)

        # Mixing: mixed[n, k, i, j] = R[n, k, i] * h[n, k, (i,) j].
        if shared and expert_rank == 1:
            # Dyadic case: with g = dL/dmixed, dL/dh = sum_i g_i R_i, and the softmax backward
            # R_i (h g_i - sum_l R_l h g_l) simplifies to mixed_i (g_i - dL/dh).
            grad_mixed = grad_mixed.view(tokens, slots, num_experts)
            grad_down_projection = (grad_mixed * routing_weights).sum(dim=-1)
            grad_logits = (grad_mixed - grad_down_projection.unsqueeze(-1)) * mixed.view(tokens, slots, num_experts)
        else:
            routing = routing_weights.unsqueeze(-1)
            if shared:
                per_slot = down_projection.reshape(tokens, slots, 1, expert_rank)
                grad_down_projection = (grad_mixed * routing).sum(dim=2)
            else:
                per_slot = down_projection.reshape(tokens, slots, num_experts, expert_rank)
                grad_down_projection = grad_mixed * routing
            grad_routing = (grad_mixed * per_slot).sum(dim=-1)
            # Softmax backward: dL/dz = R * (dL/dR - sum_i R_i dL/dR_i).
            grad_logits = routing_weights * (
                grad_routing - (grad_routing * routing_weights).sum(dim=-1, keepdim=True)
            )

        # Down-projection and router share one matrix product again.
        grad_projected = torch.cat(
            [grad_down_projection.reshape(tokens, down_rows), grad_logits.reshape(tokens, slots * num_experts)], dim=1
        )
        fused_weight = torch.cat([arrange_down_weight(down_weight, num_experts, expert_rank, shared), router_weight])
        grad_x = grad_projected @ fused_weight if ctx.needs_input_grad[0] else None
        grad_fused_weight = grad_projected.t() @ x

        grad_down = grad_fused_weight[:down_rows]
        if not shared:
            # Undo the slot-major row order: row (k*m + i)*p + j goes back to i*r + k*p + j.
            in_features = grad_down.shape[1]
            grad_down = grad_down.view(slots, num_experts, expert_rank, in_features).transpose(0, 1)
            grad_down = grad_down.reshape(down_weight.shape)
        grad_router = grad_fused_weight[down_rows:]
        grad_up = grad_up_matrix.view(out_features, slots, num_experts, expert_rank).permute(2, 0, 1, 3)
        grad_up = grad_up.reshape(up_weight.shape)
        return grad_x, grad_down, grad_router, grad_up, None, None, None, None


def mode_update(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    router_weight: Optional[torch.Tensor],
    up_weight: torch.Tensor,
    expert_rank: int,
    scaling: float = 1.0,
    dropout: Optional[torch.nn.Module] = None,
    top_k: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Compute the MoDE update for a batch of tokens.

    Args:
        x: ``(..., P)`` input, already in the adapter's dtype.
        down_weight: ``(r, P)`` shared down-projection, or ``(m * r, P)`` with rows
            ``i*r:(i+1)*r`` for expert i.
        router_weight: ``(S * m, P)``, slot-major (row ``k * m + i`` is expert i of slot k),
            or None when m = 1.
        up_weight: ``(m, Q, r)`` up-projections.
        expert_rank: p, which divides r.
        scaling: factor applied to the update (alpha / r).
        dropout: module applied to the input of the down-projection only; None or an
            inactive dropout allows the fused path.
        top_k: keep only this many experts per slot and token (renormalised); None keeps all.

    Returns:
        ``(update, routing_weights)``: the ``(..., Q)`` update and the ``(N, S, m)`` routing
        weights with N the number of tokens, detached (None when m = 1).
    """
    leading_shape = x.shape[:-1]
    tokens_x = x.reshape(-1, x.shape[-1])
    num_experts, out_features, _ = up_weight.shape

    if router_weight is None:
        # One expert: the router is the constant 1 and the update is LoRA's.
        down_input = dropout(tokens_x) if dropout is not None else tokens_x
        update = F.linear(F.linear(down_input, down_weight), up_weight[0])
        if scaling != 1.0:
            update = update * scaling
        return update.view(*leading_shape, out_features), None

    slots = router_weight.shape[0] // num_experts
    shared = down_weight.shape[0] != slots * num_experts * expert_rank
    dropout_active = dropout is not None and dropout.training and getattr(dropout, "p", 0.0) > 0.0
    autocast_active = torch.is_autocast_enabled(x.device.type)
    if not dropout_active and not autocast_active:
        update, routing_weights = _FusedMoDEUpdate.apply(
            tokens_x, down_weight, router_weight, up_weight, expert_rank, scaling, shared, top_k
        )
        return update.view(*leading_shape, out_features), routing_weights

    update, routing_weights = mode_update_autograd(
        tokens_x, down_weight, router_weight, up_weight, expert_rank, scaling, dropout, top_k
    )
    return update.view(*leading_shape, out_features), routing_weights.detach()


def mode_update_autograd(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    router_weight: torch.Tensor,
    up_weight: torch.Tensor,
    expert_rank: int,
    scaling: float = 1.0,
    dropout: Optional[torch.nn.Module] = None,
    top_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the MoDE update of ``(N, P)`` tokens with plain autograd operations.

    Used with active dropout (the router must see the input without dropout, so the two
    projections cannot share one product) and under `torch.autocast`, which casts each
    operation separately. Returns the ``(N, Q)`` update and the ``(N, S, m)`` routing weights.
    """
    num_experts = up_weight.shape[0]
    slots = router_weight.shape[0] // num_experts
    shared = down_weight.shape[0] != slots * num_experts * expert_rank
    tokens = x.shape[0]

    down_input = dropout(x) if dropout is not None else x
    down_projection = F.linear(down_input, arrange_down_weight(down_weight, num_experts, expert_rank, shared))

    router_logits = F.linear(x, router_weight).view(tokens, slots, num_experts)
    if top_k is not None and top_k < num_experts:
        router_logits = mask_to_top_k(router_logits, top_k)
    routing_weights = softmax_over_experts(router_logits)

    mixed = _mix(routing_weights, down_projection, shared, expert_rank)
    update = F.linear(mixed, arrange_up_weight(up_weight, expert_rank))
    if scaling != 1.0:
        update = update * scaling
    return update, routing_weights
