"""Activation memory of one training step with and without `set_grad_checkpointing` (issue #13).

Counts the bytes of the tensors autograd keeps for the backward pass (parameters excluded), which is
what gradient checkpointing saves; the count depends on shapes only, not on the machine. Prints a
Markdown table.

    python benchmarks/grad_checkpointing.py [--batch-size 8]
"""
from __future__ import annotations

import argparse

import timm
import torch

from vig.complexity import count_saved_activations

CASES = (("vig_ti_224_gelu", 224), ("svig_ti_224_gelu", 224), ("cnn_gat_cifar", 32))


def saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward pass of ``images`` (B, 3, H, W), parameters excluded."""
    with count_saved_activations(model) as saved:
        model(images).sum().backward()
    return saved.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print(f"| model | input | batch | saved activations, plain (MiB) | with grad checkpointing (MiB) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, size in CASES:
        model = timm.create_model(name).train()
        images = torch.randn(args.batch_size, 3, size, size)
        plain = saved_activation_bytes(model, images)
        model.set_grad_checkpointing(True)
        checkpointed = saved_activation_bytes(model, images)
        print(f"| {name} | {size} | {args.batch_size} | {plain / 2**20:.1f} | {checkpointed / 2**20:.1f} | "
              f"{checkpointed / plain:.3f} |")


if __name__ == "__main__":
    main()
