"""GAN losses of Stage 2 on the discriminator's logits (B, K heads) (TMD Alg. 2, App. A.3; METHOD.md 5.1, 5.2):
the non-saturating generator loss and the minimax discriminator loss, averaged over batch and heads, in float32.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss `mean softplus(-D(fake))` = -log sigmoid(D(fake)); log 2 at logits 0."""
    return F.softplus(-logits_fake.float()).mean()


def discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """Discriminator loss `mean softplus(D(fake)) + mean softplus(-D(real))`: real is labelled 1, fake 0;
    2 log 2 at logits 0."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
