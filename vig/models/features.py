"""What the models share for timm's feature API (`forward_intermediates`, ``features_only=True``)."""
from __future__ import annotations


def check_feature_request(output_fmt: str, norm: bool) -> None:
    """ValueError unless the request is what every model here gives: 'NCHW' maps, no final norm."""
    if output_fmt != "NCHW":
        raise ValueError(f"output_fmt={output_fmt!r} is not supported; the features are 'NCHW' maps")
    if norm:
        raise ValueError("norm=True is not supported: the model has no final norm layer")
