"""Layer 3, command-line tools: MACs (``vig-macs``), throughput (``vig-benchmark``), graph pictures
(``vig-visualize``), training curves (``vig-plot``) and torch.export / ONNX export with an ONNX Runtime
check (``vig-export``); each also runs as ``python -m vig.tools.<name>``.

May import the models layer and the trainer (``vig.trainer``); nothing imports the tools.
"""
