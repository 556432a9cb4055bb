"""The canonical MoE layer and what it computes: the one model of an MoE block every stage reads.

``layer.py`` holds :class:`~moec.canonical.layer.MoELayer` (routing rule, expert weights in one
layout); ``semantics.py`` its numpy meaning (routing, experts, capacity, an artifact's changes).
The frontend produces layers and confirms them with these semantics; the reference, the router
profile and ``verify`` read them. It lives apart from both frontend and reference so that each
imports it and neither imports the other for it; it imports nothing of moec itself.
"""
