"""Deployment: self-contained policy directories (:mod:`vitavla.serving.export`) and an openpi-compatible
websocket policy server (:mod:`vitavla.serving.server`)."""
