"""Transports: turn media from the network into codec packets for a ``Call``."""
