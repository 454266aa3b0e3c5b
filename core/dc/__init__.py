"""Difference models (paper appendix D): networks trained as ``f = g - h`` with monotone or
convex streams by construction (``core.dc.models``), their training and the ``train-dc``
command (``core.dc.train``) and their explanations (``core.dc.explain``)."""
