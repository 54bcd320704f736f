"""The optional adversarial term (docs/methods.md section 1.2)."""

from tdd.adversarial.base import Adversarial, NoAdversarial
from tdd.adversarial.discriminator import (
    Discriminator,
    DiscriminatorHead,
    transformer_features,
    unet_features,
)
from tdd.adversarial.hinge import HingeAdversarial, hinge_discriminator, hinge_generator

__all__ = [
    "Adversarial", "NoAdversarial", "HingeAdversarial", "Discriminator", "DiscriminatorHead",
    "unet_features", "transformer_features", "hinge_discriminator", "hinge_generator",
]
