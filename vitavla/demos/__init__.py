"""Demonstration generators: scripted experts that record demos in the on-disk formats the datamodules read.

``vitavla demos libero ...`` runs :mod:`vitavla.demos.libero_scripted` (needs the ``sim`` extra).
"""
