"""Launchers: torchrun entry and Ray Train."""
