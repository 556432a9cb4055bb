"""Recognises MoE blocks written with standard ONNX ops, whatever exporter wrote them.

Recognition is by structure, confirmed by semantics; each module holds one step:

- ``walks.py``: the graph walks every step asks (downstream, upstream, routing area, views,
  constant subgraphs, closed regions).
- ``operands.py``: the constants a node reads (matmul weights in their exporters' forms, biases,
  scalars).
- ``router.py``: which matmul is a router and which routing rules its routing area may compute.
- ``experts.py``: the experts a region computes, read off its matmuls and activations.
- ``unmodelled.py``: expert capacities, and refusing an experts loop a trace unrolled for only
  the experts its input hit.
- ``confirm.py``: running a candidate region alone and comparing it with the layer's numpy
  semantics.
- ``finder.py``: :func:`~moec.frontend.standard.finder.find_standard_blocks`, which puts the
  steps together: router, region, candidates, the first confirmed.
"""
