"""Names and small parsers that the typed config and the data pipeline share: the dataset and crop names, the
repeated-augmentation count, and the ``--aa`` policy strings (timm's, and torchvision's RandAugment as
``tv-rand[-n<ops>][-m<magnitude>][-b<bins>]``).

A leaf of the trainer: it imports no other trainer module, so that `vig.trainer.config` can check augmentation
settings and `vig.trainer.data` can build them without importing each other.
"""
from __future__ import annotations

import re

from timm.data import auto_augment
from torchvision import transforms

from vig.errors import UsageError

SYNTHETIC_DATASET = "synthetic"
REPEATED_AUG_REPEATS = 3
TRAIN_CROPS = ("pad", "rrc")  # random crop of the 4-px-padded 32-px image; random-resized crop
TV_RAND_PREFIX = "tv-rand"
# torchvision RandAugment's defaults: num_ops, magnitude, num_magnitude_bins
TV_RAND_DEFAULTS = {"n": 2, "m": 9, "b": 31}


def is_tv_rand_policy(policy: str | None) -> bool:
    """True when an `--aa` value names torchvision's RandAugment (`tv-rand...`) rather than a timm policy."""
    return policy is not None and policy.startswith(TV_RAND_PREFIX)


def tv_rand_augment(policy: str) -> transforms.RandAugment:
    """torchvision's RandAugment from `--aa tv-rand[-n<ops>][-m<magnitude>][-b<bins>]` (e.g. tv-rand-n2-m12).

    Unset keys take torchvision's defaults (n 2, m 9, b 31 magnitude bins); the magnitude is a bin index,
    0 .. bins - 1. Interpolation (nearest) and fill (black) are torchvision's defaults. Posterize keeps
    8 - round(4 * m / (bins - 1)) >= 4 bits, which Pillow 13 accepts at every magnitude. UsageError (one
    line) for a malformed string or out-of-range values.
    """
    usage = f"--aa {policy!r}: expected {TV_RAND_PREFIX}[-n<ops>][-m<magnitude>][-b<bins>], e.g. {TV_RAND_PREFIX}-n2-m12"
    rest = policy[len(TV_RAND_PREFIX):]
    if rest and not rest.startswith("-"):
        raise UsageError(usage)
    values = dict(TV_RAND_DEFAULTS)
    given: set[str] = set()
    for part in rest.split("-")[1:]:
        match = re.fullmatch(r"([nmb])(\d+)", part)
        if match is None or match.group(1) in given:
            raise UsageError(usage)
        given.add(match.group(1))
        values[match.group(1)] = int(match.group(2))
    if values["n"] < 1:
        raise UsageError(f"--aa {policy!r}: needs at least one op per image (n >= 1)")
    if values["b"] < 2:
        raise UsageError(f"--aa {policy!r}: needs at least 2 magnitude bins (b >= 2)")
    if values["m"] >= values["b"]:
        raise UsageError(f"--aa {policy!r}: magnitude {values['m']} is not a bin of 0 .. {values['b'] - 1}")
    return transforms.RandAugment(num_ops=values["n"], magnitude=values["m"], num_magnitude_bins=values["b"])


def check_aa_policy(policy: str | None) -> None:
    """Build the ``--aa`` augmentation once, so that a malformed policy is a one-line UsageError when the config
    is built, not an assertion deep in the first training batch (None / '': no policy)."""
    if not policy:
        return
    if is_tv_rand_policy(policy):
        tv_rand_augment(policy)
        return
    if policy.startswith("rand"):
        build = auto_augment.rand_augment_transform
    elif policy.startswith("augmix"):
        build = auto_augment.augment_and_mix_transform
    else:
        build = auto_augment.auto_augment_transform
    try:
        build(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError):
        raise UsageError(f"--aa {policy!r} is not a timm augmentation policy (e.g. rand-m9-mstd0.5-inc1, "
                         "augmix-m5-w3, original, v0, 3a) nor tv-rand[-n<ops>][-m<magnitude>][-b<bins>]") from None
