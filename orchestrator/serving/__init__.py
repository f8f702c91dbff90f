"""Serving the layout stage: the Triton model repository, its python-model adapters over the
stages, the bundled server.
"""
