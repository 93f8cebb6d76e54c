"""`paper` mode: the s-DIET multistep update (Appendix D.2, Eq. 18-20, Listing 1), for reproduction.

A row is updated only when it is in the batch: one real step with its gradient, then `n` skipped
steps in closed form, all at the step's learning rate η and weight decay λ, where n = N/B − 1
("we approximate t = N/B" and Listing 1 applies t − 1 multisteps; n may be fractional).

AdamW (Listing 1; bias correction dropped, ψ_t = 1; μ = β1/√β2, ε kept inside the fraction):
    θ ← (1 − ηλ)θ;  m ← β1 m + (1 − β1)g;  v ← β2 v + (1 − β2)g²;  θ ← θ − η m/(√v + ε)
    α1 = (1 − ηλ)^n,  α2 = (α1 η μ − η μ^{n+1}) / (1 − ηλ − μ)
    θ ← α1 θ − α2 m/(√v + ε);  m ← β1^n m;  v ← β2^n v                              (Eq. 18)
SGD with momentum (Eq. 19, decoupled weight decay as written in the paper, its "τ" = 1 − dampening):
    m ← μ m + (1 − dampening) g;  θ ← (1 − ηλ)θ − η m
    θ ← α1 θ − α2 m  (α1, α2 as above with μ = momentum);  m ← μ^n m                  (Eq. 20)

Sign: Eq. 18/20 as printed read "+ (…) m₀"; solving the recurrence θ_k = (1 − ηλ)θ_{k−1} − η μ^k m₀
gives "−", as Listing 1 has (`head = alpha1 * head - alpha2 * m / (sqrt(v) + eps)`); we follow the
listing. When 1 − ηλ = μ the fraction is replaced by its limit n η μ^n.

Cost: a handful of elementwise torch ops on (M, d); runs on any device.
"""

from __future__ import annotations

import torch


def multistep_coefficients(lr: float, weight_decay: float, mu: float, n: float):
    """(α1, α2) of Eq. 18/20 for n skipped steps at learning rate lr."""
    decay = 1.0 - lr * weight_decay
    alpha1 = decay**n
    if abs(decay - mu) < 1e-12:
        return alpha1, n * lr * mu**n
    return alpha1, (alpha1 * lr * mu - lr * mu ** (n + 1)) / (decay - mu)


@torch.no_grad()
def adamw_paper_step(weight, exp_avg, exp_avg_sq, grad, *, lr, weight_decay, betas, eps, n):
    """Listing 1 on rows (M, d), in place."""
    b1, b2 = betas
    weight.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(b1).add_(grad, alpha=1.0 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
    ratio = exp_avg / (exp_avg_sq.sqrt() + eps)  # (M, d)
    weight.sub_(lr * ratio)
    alpha1, alpha2 = multistep_coefficients(lr, weight_decay, b1 / b2**0.5, n)
    weight.mul_(alpha1).sub_(alpha2 * ratio)
    exp_avg.mul_(b1**n)
    exp_avg_sq.mul_(b2**n)


@torch.no_grad()
def sgd_paper_step(weight, buf, grad, *, lr, weight_decay, momentum, dampening, n):
    """Eq. 19 then Eq. 20 on rows (M, d), in place."""
    buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
    weight.mul_(1.0 - lr * weight_decay).sub_(lr * buf)
    alpha1, alpha2 = multistep_coefficients(lr, weight_decay, momentum, n)
    weight.mul_(alpha1).sub_(alpha2 * buf)
    buf.mul_(momentum**n)
