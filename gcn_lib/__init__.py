"""Graph construction and graph convolutions for Vision GNNs (pure torch, no timm)."""
from .aggregate import (gather_neighbours, masked_key_max, max_relative_dense, max_relative_gather, max_relative_ranked,
                        max_relative_scatter)
from . import kernels
from .axial import DAGA, SVGA, daga_aggregate, daga_edges, daga_mask, daga_threshold, svga_aggregate, svga_mask
from .conv import CONVS, MASK_CONVS, EdgeConv2d, GINConv2d, GraphSAGE, MRConv2d, graph_conv, graph_form
from .dynamic import GRAPHS, DynConv2d
from .graph import (dense_knn, normalized_nodes, pairwise_sq_distance, reduced_keys, similarity_stats, threshold_mask,
                    threshold_quantile)
from .layers import ACTIVATIONS, NORMS, BasicConv, act_layer, init_convs_, interleave_channels, norm_layer
from .pos_embed import relative_position_table, sincos_2d
from .sparse import (drop_edge, edge_index_to_mask, grid_edges, knn_to_edge_index, knn_to_mask, mask_to_edge_index,
                     sparse_knn, to_pyg)

__all__ = [
    "ACTIVATIONS", "CONVS", "kernels", "GRAPHS", "MASK_CONVS", "NORMS",
    "BasicConv", "DAGA", "SVGA", "DynConv2d", "EdgeConv2d", "GINConv2d", "GraphSAGE", "MRConv2d",
    "act_layer", "daga_aggregate", "daga_edges", "daga_mask", "daga_threshold", "dense_knn", "drop_edge", "edge_index_to_mask", "gather_neighbours", "graph_conv",
    "graph_form", "grid_edges", "init_convs_", "interleave_channels", "knn_to_edge_index", "knn_to_mask",
    "mask_to_edge_index", "masked_key_max", "max_relative_dense", "max_relative_gather", "max_relative_ranked",
    "max_relative_scatter",
    "norm_layer", "normalized_nodes", "pairwise_sq_distance", "reduced_keys", "relative_position_table",
    "similarity_stats", "sincos_2d", "sparse_knn", "threshold_mask", "threshold_quantile", "to_pyg",
]
