"""Plain-loop reference of the MoDE update, written from the formula and nothing else.

For one token x (1 x P):

    R_k(x) = softmax over i of (x W_R,k)                          (W_R,k is P x m)
    update = scaling * sum_k sum_i R_{k,i}(x) * x A_k B_{i,k}^T

A_k is columns k*p:(k+1)*p of A (P x r), B_{i,k} the same columns of expert i's B (Q x r).
With a down-projection per expert, A_k is replaced by expert i's own A_{i,k}.
With top-k routing, only the k experts with the largest R_{k,i} keep a weight, and
those weights are divided by their sum.
"""

from __future__ import annotations

import math

import torch


def reference_update(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    router_weight,
    up_weight: torch.Tensor,
    expert_rank: int,
    shared: bool,
    scaling: float = 1.0,
    top_k=None,
) -> torch.Tensor:
    """Loop over tokens, slots and experts; weights in the peft-mode state-dict layout.

    down_weight: (r, P) or (m * r, P); router_weight: (S * m, P) or None; up_weight: (m, Q, r).
    """
    num_experts, out_features, rank = up_weight.shape
    slots = rank // expert_rank
    tokens = x.reshape(-1, x.shape[-1]).double()
    outputs = torch.zeros(tokens.shape[0], out_features, dtype=torch.float64)
    for n in range(tokens.shape[0]):
        token = tokens[n]
        for k in range(slots):
            columns = slice(k * expert_rank, (k + 1) * expert_rank)
            if router_weight is None:
                weights = [1.0]
            else:
                logits = [
                    float(token @ router_weight[k * num_experts + i].double()) for i in range(num_experts)
                ]
                largest = max(logits)
                exps = [math.exp(value - largest) for value in logits]
                weights = [value / sum(exps) for value in exps]
                if top_k is not None:
                    chosen = sorted(range(num_experts), key=lambda i: -weights[i])[:top_k]
                    total = sum(weights[i] for i in chosen)
                    weights = [weights[i] / total if i in chosen else 0.0 for i in range(num_experts)]
            for i in range(num_experts):
                if shared:
                    a_k = down_weight[columns].double()  # (p, P): rows of the (r, P) weight
                else:
                    a_k = down_weight[i * rank : (i + 1) * rank][columns].double()
                b_ik = up_weight[i][:, columns].double()  # (Q, p)
                outputs[n] += weights[i] * (b_ik @ (a_k @ token))
    return (scaling * outputs).reshape(*x.shape[:-1], out_features)
