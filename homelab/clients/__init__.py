"""Clients for the systems the layers talk to."""
